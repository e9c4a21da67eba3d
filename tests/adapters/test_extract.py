"""Adapters extracted from fully fine-tuned checkpoints (hyprjax/adapters/extract.py), and the
`hyprjax adapters extract` command."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hyprjax.adapters.adapters_cli import main as cli
from hyprjax.adapters.extract import (check_same_shape, density_for_ratio, extract_adapter, model_kernels,
                                      split_delta, truncated_svd)
from hyprjax.adapters.lora import MODULES, AdapterError, module_shapes
from hyprjax.config import ModelConfig

CFG = ModelConfig(arch="qwen3", vocab_size=400, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=24, max_position_embeddings=512, tie_word_embeddings=True)


def low_rank_plus_sparse(din: int, dout: int, rank: int, nnz: int, rng, block: int | None = None) -> np.ndarray:
    """rank-`rank` (entries ~0.01) plus `nnz` entries (or b x b blocks) of ~0.05, at random places."""
    low = rng.standard_normal((din, rank)) @ rng.standard_normal((rank, dout)) * 0.01 if rank else 0.0
    sparse = np.zeros((din, dout))
    if block:
        nb = (din // block) * (dout // block)
        for j in rng.choice(nb, nnz, replace=False):
            r, c = divmod(int(j), dout // block)
            sparse[r * block:(r + 1) * block, c * block:(c + 1) * block] = rng.standard_normal((block, block)) * 0.05
    else:
        sparse.flat[rng.choice(din * dout, nnz, replace=False)] = rng.standard_normal(nnz) * 0.05
    return low + sparse


@pytest.mark.parametrize("rank,density,block", [(2, 0.02, None), (3, 0.0, None), (0, 0.05, None), (2, 1 / 12, 16),
                                                (0, 0.25, 32)], ids=["lora+sparse", "lora", "sparse", "lora+blocks",
                                                                     "blocks"])
def test_exact_low_rank_plus_sparse_is_recovered(rank, density, block):
    rng = np.random.default_rng(0)
    shapes = module_shapes(CFG)
    base, tuned = {}, {}
    for layer in range(CFG.num_layers):
        for name, (din, dout) in shapes.items():
            if block and (din % block or dout % block):
                continue
            units = (din // block) * (dout // block) if block else din * dout
            base[(layer, name)] = rng.standard_normal((din, dout)).astype(np.float32) * 0.02
            delta = low_rank_plus_sparse(din, dout, rank, int(round(density * units)), rng, block)
            tuned[(layer, name)] = base[(layer, name)].astype(np.float64) + delta
    modules = tuple({name for _, name in base})
    ad = extract_adapter(base, tuned, CFG, rank=rank, density=density, block=block, refine=30, modules=modules,
                         progress=False)
    want_kind = {(True, False): "lora", (False, True): "block-sparse" if block else "shira"}.get(
        (bool(rank), bool(density)), "lora+sparse")
    assert ad.kind == want_kind
    for key in base:
        want = tuned[key] - base[key].astype(np.float64)
        np.testing.assert_allclose(ad.delta(*key), want, atol=2e-6 * np.abs(want).max(), rtol=0)
        if rank:
            assert ad.modules[key].rank == rank and ad.modules[key].scale == 1.0
        if density:
            units = want.size // (block * block) if block else want.size
            assert ad.sparse[key].params == int(round(density * units)) * (block * block if block else 1)


def test_refinement_never_increases_the_error():
    rng = np.random.default_rng(1)
    d = rng.standard_normal((96, 64)) * np.logspace(0, -2, 64)  # a full-rank delta with a decaying spectrum
    errs = []
    for refine in (0, 1, 3):
        lo, sp = split_delta(d, rank=4, nnz=300, refine=refine)
        errs.append(np.linalg.norm(d - lo.delta() - sp.delta()))
    assert errs[0] >= errs[1] >= errs[2] and errs[2] < 0.99 * errs[0]


def test_randomized_svd_matches_the_exact_truncation():
    rng = np.random.default_rng(2)
    m = rng.standard_normal((300, 500)) * (0.95 ** np.arange(300))[:, None]
    u, s, vt = truncated_svd(m, 8)  # 8 + 10 columns << 300: the randomized path
    exact = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(s, exact[:8], rtol=1e-4)  # a slowly decaying spectrum, the hard case
    assert np.linalg.norm(m - (u * s) @ vt) <= np.sqrt((exact[8:] ** 2).sum()) * (1 + 1e-5)
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-10)


def test_size_ratio_sets_the_values_kept():
    rng = np.random.default_rng(3)
    shapes = module_shapes(CFG)
    base = {(0, n): np.zeros(shapes[n], np.float32) for n in MODULES}
    tuned = {k: rng.standard_normal(v.shape) for k, v in base.items()}
    cfg = CFG.replace(num_layers=1)
    total = sum(din * dout for din, dout in shapes.values())
    for rank, ratio in ((0, 20.0), (2, 10.0)):
        ad = extract_adapter(base, tuned, cfg, rank=rank, density=0, size_ratio=ratio, refine=0, progress=False)
        assert abs(ad.params - total / ratio) <= len(MODULES), (ad.params, total / ratio)
    assert density_for_ratio(cfg, 2, 10.0) > 0
    with pytest.raises(AdapterError, match="lower --rank or --size-ratio"):
        extract_adapter(base, tuned, cfg, rank=40, density=0, size_ratio=50.0, progress=False)


@pytest.mark.parametrize("kw,why", [(dict(rank=-1, density=0.1), "rank -1"), (dict(rank=0, density=1.5), "density"),
                                    (dict(rank=2, density=0.1, block=24), "multiple of 16"),
                                    (dict(rank=0, density=0), "extract nothing"),
                                    (dict(rank=1, density=0, size_ratio=0.5), "size ratio")])
def test_bad_arguments(kw, why):
    base = {(0, "q_proj"): np.zeros((64, 96), np.float32)}
    with pytest.raises(AdapterError, match=why):
        extract_adapter(base, base, CFG, modules=("q_proj",), progress=False, **kw)


def test_identical_checkpoints_extract_nothing():
    base = {(layer, "q_proj"): np.ones((64, 96), np.float32) for layer in range(2)}
    with pytest.raises(AdapterError, match="nothing to extract"):
        extract_adapter(base, base, CFG, rank=2, density=0, modules=("q_proj",), progress=False)


def test_different_architectures_are_refused():
    with pytest.raises(AdapterError, match="intermediate_size"):
        check_same_shape(CFG, CFG.replace(intermediate_size=128))


# ---------------------------------------------------------------- real checkpoints, through load_model and the CLI

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny qwen3 HF directory and a "fine-tune" of it: every linear weight plus an exact
    rank-2 + 2%-sparse delta (HF layout [out, in], float32)."""
    from safetensors.numpy import load_file, save_file

    from tests.tiny_models import make_hf_model

    d = tmp_path_factory.mktemp("extract")
    make_hf_model(d / "base", "qwen3", vocab_size=400)
    shutil.copytree(d / "base", d / "tuned")
    tensors = load_file(d / "base" / "model.safetensors")
    original = dict(tensors)
    rng = np.random.default_rng(4)
    deltas = {}
    for layer in range(2):
        for name in MODULES:
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"model.layers.{layer}.{block}.{name}.weight"
            dout, din = tensors[key].shape
            delta = low_rank_plus_sparse(din, dout, 2, int(round(0.02 * din * dout)), rng)
            tensors[key] = (tensors[key] + delta.T).astype(np.float32)
            deltas[(layer, name)] = tensors[key].T.astype(np.float64) - original[key].T
    save_file(tensors, d / "tuned" / "model.safetensors", metadata={"format": "pt"})
    return dict(dir=d, deltas=deltas)


def test_model_kernels_are_the_same_stacked_or_per_layer(checkpoints):
    from hyprjax.formats.load import load_model

    kw = dict(with_tokenizer=False, progress=False)
    per_layer = load_model(checkpoints["dir"] / "tuned", scan_layers=False, **kw)
    stacked = load_model(checkpoints["dir"] / "tuned", scan_layers=True, **kw)
    a = dict(model_kernels(per_layer.model, per_layer.cfg))
    b = dict(model_kernels(stacked.model, stacked.cfg))
    assert a.keys() == b.keys() == {(layer, m) for layer in range(2) for m in MODULES}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    packed = load_model(checkpoints["dir"] / "tuned", quantization="int8", **kw)
    with pytest.raises(AdapterError, match="quantized"):
        dict(model_kernels(packed.model, packed.cfg))


def test_cli_extract_recovers_the_fine_tune(checkpoints, tmp_path):
    from hyprjax.adapters.load import read_adapter
    from hyprjax.formats.load import read_config

    d = checkpoints["dir"]
    out = tmp_path / "x.vdb"
    rc = cli(["adapters", "extract", "--base", str(d / "base"), "--tuned", str(d / "tuned"), "--rank", "2",
              "--density", "0.02", "--refine", "30", "--out", str(out)])
    assert rc == 0
    cfg = read_config(d / "base")[0]
    ad = read_adapter(out, "x", cfg)
    assert ad.kind == "lora+sparse" and ad.name == "x"
    for key, want in checkpoints["deltas"].items():
        np.testing.assert_allclose(ad.delta(*key), want, atol=2e-6 * np.abs(want).max(), rtol=0)
    # Quantized: the same adapter within int8's step; a low-rank-only extraction goes to GGUF and PEFT.
    assert cli(["adapters", "extract", "--base", str(d / "base"), "--tuned", str(d / "tuned"), "--rank", "2",
                "--density", "0.02", "--refine", "30", "--quantize", "int8", "--out", str(tmp_path / "q.vdb")]) == 0
    q = read_adapter(tmp_path / "q.vdb", "q", cfg)
    for key, want in checkpoints["deltas"].items():
        assert np.abs(q.delta(*key) - want).max() < 0.02 * np.abs(want).max()
    # The target-size form: rank 2 plus sparse entries, a tenth of the weights' values in all.
    assert cli(["adapters", "extract", "--base", str(d / "base"), "--tuned", str(d / "tuned"), "--rank", "2",
                "--size-ratio", "10", "--out", str(tmp_path / "s.vdb")]) == 0
    s = read_adapter(tmp_path / "s.vdb", "s", cfg)
    assert s.kind == "lora+sparse" and abs(s.density(cfg) - 1 / 10) < 1e-3
    for dst in ("r.gguf", "r_peft"):
        assert cli(["adapters", "extract", "--base", str(d / "base"), "--tuned", str(d / "tuned"), "--rank", "4",
                    "--out", str(tmp_path / dst)]) == 0
        assert read_adapter(tmp_path / dst, "r", cfg).kind == "lora"


@pytest.mark.parametrize("extra,why", [
    (["--rank", "2", "--density", "0.1", "--out", "{tmp}/x.gguf"], "holds low-rank modules only"),
    (["--density", "0.1", "--out", "{tmp}/peft_dir"], "write a .vdb"),
    (["--rank", "0", "--out", "{tmp}/x.vdb"], "nothing to extract"),
    (["--rank", "2", "--block", "24", "--density", "0.1", "--out", "{tmp}/x.vdb"], "multiple of 16"),
    (["--rank", "2", "--density", "0.1", "--size-ratio", "10", "--out", "{tmp}/x.vdb"], "not both"),
    (["--rank", "2", "--out", "{tmp}/nodir/x.vdb"], "does not exist"),
    (["--rank", "2", "--out", "{tmp}/x.vdb", "--tuned-is", "{tmp}/missing"], "no such file"),
    (["--rank", "2", "--out", "{tmp}/x.vdb", "--tuned-is", "{base}/../other"], "differ in intermediate_size"),
])
def test_cli_extract_errors_are_one_line(checkpoints, tmp_path, capsys, extra, why):
    from tests.tiny_models import make_hf_model

    d = checkpoints["dir"]
    if not (d / "other").exists():
        make_hf_model(d / "other", "qwen3", vocab_size=400, intermediate_size=96)
    args = [a.format(tmp=tmp_path, base=d / "base") for a in extra]
    tuned = str(d / "tuned")
    if "--tuned-is" in args:
        i = args.index("--tuned-is")
        tuned = args[i + 1]
        del args[i:i + 2]
    rc = cli(["adapters", "extract", "--base", str(d / "base"), "--tuned", tuned, *args])
    err = capsys.readouterr().err
    assert rc == 2 and why in err and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]  # progress bars may come before
    assert len(lines) == 1 and lines[0].startswith("hyprjax: error: ") and err.rstrip().endswith(lines[0])
