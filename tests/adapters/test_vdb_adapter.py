"""Adapters as .vdb files (hyprjax/adapters/vdb_adapter.py): quantized codes against OpenVDB 10 itself,
and `hyprjax adapters convert / info` between PEFT (LoRA, SHiRA), llama.cpp GGUF and .vdb."""

from __future__ import annotations

import copy
import re
import subprocess

import numpy as np
import pytest

from hyprjax.adapters.adapters_cli import adapter_info, main as cli
from hyprjax.adapters.lora import AdapterError, LoraAdapter, LoraModule, module_shapes
from hyprjax.adapters.sparse import blocks_from_dense, sparse_from_dense
from hyprjax.adapters.vdb import VdbGrid, read_vdb, write_vdb
from hyprjax.adapters.vdb_adapter import (QUANTIZATIONS, adapter_grids, dequantize_grids, read_adapter_vdb,
                                          write_adapter_vdb)
from hyprjax.config import ModelConfig
from tests.adapters.test_vdb import _openvdb_missing, reference_read, voxel_keys
from tests.deps import missing, need

CFG = ModelConfig(arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture
def openvdb():
    if why := _openvdb_missing():
        missing(why)


def rosa_adapter(seed: int = 0) -> LoraAdapter:
    """Low-rank modules everywhere (magnitudes differing per rank vector), element-sparse parts on
    every module but up_proj, block-sparse there; never-zero values."""
    rng = np.random.default_rng(seed)
    modules, sparse = {}, {}
    for layer in range(CFG.num_layers):
        for name, (din, dout) in module_shapes(CFG).items():
            spread = np.logspace(0, -2, 4)  # rank vectors of very different sizes, as an SVD gives
            modules[(layer, name)] = LoraModule((rng.standard_normal((din, 4)) * spread).astype(np.float32),
                                                (rng.standard_normal((4, dout)) * 0.05).astype(np.float32), 0.5)
            dense = rng.standard_normal((din, dout)) * 10.0 ** rng.uniform(-4, -1)
            sparse[(layer, name)] = blocks_from_dense(dense, 3, 16) if name == "up_proj" else \
                sparse_from_dense(dense, 90)
    return LoraAdapter("rosa", "", modules, sparse=sparse)


def run_scales(coords: np.ndarray, values: np.ndarray, order: str, group: int, qmax: int) -> np.ndarray:
    """A plain-loop reference of the run layout: the largest |value| / qmax of each voxel's run."""
    out = np.zeros(len(values))
    for z in np.unique(coords[:, 2]):
        idx = np.flatnonzero(coords[:, 2] == z)
        fast, slow = (1, 0) if order == "zxy" else (0, 1)
        idx = idx[np.lexsort((coords[idx, fast], coords[idx, slow]))]
        for start in range(0, len(idx), group):
            run = idx[start:start + group]
            out[run] = np.abs(values[run]).max() / qmax
    return out


@pytest.mark.parametrize("mode", sorted(QUANTIZATIONS))
def test_quantized_round_trip_is_within_half_a_step(tmp_path, mode):
    ad = rosa_adapter()
    plain, _ = adapter_grids(ad, CFG)
    path = tmp_path / "q.vdb"
    write_adapter_vdb(path, ad, CFG, quantize=mode)
    grids, meta = read_vdb(path)
    assert meta["hyprjax_adapter"] == 2 and meta["quantization"] == mode
    by_name = {g.name: g for g in grids}
    qmax, group = QUANTIZATIONS[mode]
    back = {g.name: g for g in dequantize_grids(grids, "test")}
    for want in plain:
        codes = by_name[want.name]
        assert codes.metadata["quantization"] == mode and f"{want.name}.qscale" in by_name
        assert np.array_equal(np.sort(voxel_keys(codes.coords)), np.sort(voxel_keys(want.coords)))
        assert np.all(codes.values == np.rint(codes.values)) and np.abs(codes.values).max() == qmax
        got = back[want.name]
        a, b = np.argsort(voxel_keys(got.coords)), np.argsort(voxel_keys(want.coords))
        step = run_scales(want.coords[b], want.values[b].astype(np.float64), codes.metadata["quant_order"], group,
                          qmax)
        err = np.abs(got.values[a].astype(np.float64) - want.values[b])
        # half a step of the run's scale, rounded up to half precision (relative 2^-10), plus f32 rounding
        assert np.all(err <= step * (1 + 2 ** -10) / 2 + 1e-7 * np.abs(want.values[b])), (want.name, err.max())
        assert err.max() > 0  # it did quantize
    # The adapter read back: the same kind and modules, deltas within the bound.
    got = read_adapter_vdb(path, "rosa", CFG)
    assert got.kind == ad.kind and set(got.modules) == set(ad.modules) and set(got.sparse) == set(ad.sparse)
    for key in ad.sparse:
        assert got.sparse[key].kind == ad.sparse[key].kind
    rel = max(np.abs(got.delta(*k) - ad.delta(*k)).max() / np.abs(ad.delta(*k)).max() for k in ad.modules)
    assert rel < (0.02 if mode == "int8" else 0.3)


def test_unquantized_files_keep_format_version_1(tmp_path):
    ad = rosa_adapter()
    grids, meta = adapter_grids(ad, CFG, half=True)
    assert meta["hyprjax_adapter"] == 1 and "quantization" not in meta
    assert all(set(g.metadata) == {"hyprjax_part", "shape", "block", "scale", "dtype", "base_model"} for g in grids)
    assert not any(g.name.endswith(".qscale") for g in grids)
    write_adapter_vdb(tmp_path / "f.vdb", ad, CFG)
    got = read_adapter_vdb(tmp_path / "f.vdb", "rosa", CFG)
    for key in ad.modules:
        np.testing.assert_allclose(got.delta(*key), ad.delta(*key), rtol=1e-6, atol=1e-9)


def test_extreme_and_zero_values(tmp_path):
    """Scales far from half's range are shifted by a power of two; a run of zeros stays zero."""
    din, dout = module_shapes(CFG)["q_proj"]
    rng = np.random.default_rng(1)
    sparse = {}
    for layer, size in ((0, 1e-12), (1, 3e3), (2, 0.0)):
        dense = rng.standard_normal((din, dout)) * size + (size == 0) * 1e-30
        m = sparse_from_dense(dense, 200)
        if size == 0:
            m.values[:] = 0.0
        sparse[(layer, "q_proj")] = m
    ad = LoraAdapter("x", "", {}, sparse=sparse)
    for mode in QUANTIZATIONS:
        write_adapter_vdb(tmp_path / "x.vdb", ad, CFG, quantize=mode)
        got = read_adapter_vdb(tmp_path / "x.vdb", "x", CFG)
        for layer, m in enumerate(sparse[(k, "q_proj")] for k in range(3)):
            g = got.sparse[(layer, "q_proj")]
            np.testing.assert_array_equal(g.rows, m.rows)
            err = np.abs(g.values - m.values).max()
            assert err <= np.abs(m.values).max() / QUANTIZATIONS[mode][0] * 0.51, (mode, layer, err)
            assert np.isfinite(g.values).all()


def test_broken_quantized_files_are_adapter_errors(tmp_path):
    ad = LoraAdapter("x", "", {}, sparse={(0, "q_proj"): sparse_from_dense(np.ones((64, 128)), 10)})
    grids, meta = adapter_grids(ad, CFG, quantize="int8")
    codes, scales = grids
    cases = {"scale grid .* is missing": [codes],
             "not int8 codes": [VdbGrid(codes.name, codes.coords, codes.values * 1.5, codes.metadata), scales],
             "no scale for some runs": [codes, VdbGrid(scales.name, scales.coords + [0, 1, 0], scales.values,
                                                       scales.metadata)],
             "unknown quantization": [VdbGrid(codes.name, codes.coords, codes.values,
                                              {**codes.metadata, "quantization": "int3"}), scales]}
    for why, gs in cases.items():
        write_vdb(tmp_path / "b.vdb", gs, half=True, metadata=meta)
        with pytest.raises(AdapterError, match=why):
            read_adapter_vdb(tmp_path / "b.vdb", "x", CFG)
    with pytest.raises(AdapterError, match="quantize='int2'"):
        write_adapter_vdb(tmp_path / "c.vdb", ad, CFG, quantize="int2")


def test_older_readers_refuse_quantized_files(tmp_path, monkeypatch):
    import hyprjax.adapters.vdb_adapter as va

    ad = LoraAdapter("x", "", {}, sparse={(0, "q_proj"): sparse_from_dense(np.ones((64, 128)), 10)})
    write_adapter_vdb(tmp_path / "q.vdb", ad, CFG, quantize="int4")
    monkeypatch.setattr(va, "FORMAT_VERSION", 1)
    with pytest.raises(AdapterError, match="format version 2; this hyprjax reads up to 1"):
        read_adapter_vdb(tmp_path / "q.vdb", "x", CFG)


# ---------------------------------------------------------------- OpenVDB itself

@pytest.mark.parametrize("mode", sorted(QUANTIZATIONS))
def test_openvdb_reads_quantized_files(tmp_path, openvdb, mode):
    """pyopenvdb sees the unquantized file's active voxels, integer codes and the scale grids; our
    dequantizer on what OpenVDB read gives what our reader gives."""
    ad = rosa_adapter(1)
    write_adapter_vdb(tmp_path / "f.vdb", ad, CFG)
    write_adapter_vdb(tmp_path / "q.vdb", ad, CFG, quantize=mode)
    top_f, arr_f = reference_read(tmp_path / "f.vdb")
    top_q, arr_q = reference_read(tmp_path / "q.vdb")
    assert top_q["metadata"]["quantization"] == mode and top_q["metadata"]["hyprjax_adapter"] == 2
    plain = {g["name"]: i for i, g in enumerate(top_f["grids"])}
    theirs = []
    for i, g in enumerate(top_q["grids"]):
        assert g["half"] and g["type"] == "float"
        assert g["activeVoxelCount"] == len(arr_q[f"coords_{i}"])
        theirs.append(VdbGrid(g["name"], arr_q[f"coords_{i}"], arr_q[f"values_{i}"],
                              {k: tuple(v) if isinstance(v, list) else v for k, v in g["metadata"].items()}))
        if g["name"].endswith(".qscale"):
            continue
        j = plain[g["name"]]
        np.testing.assert_array_equal(np.sort(voxel_keys(arr_q[f"coords_{i}"])),
                                      np.sort(voxel_keys(arr_f[f"coords_{j}"])))
        v = arr_q[f"values_{i}"]
        assert np.all(v == np.rint(v)) and np.abs(v).max() <= QUANTIZATIONS[mode][0]
    assert sorted(g.name for g in theirs) == sorted([*plain, *(f"{n}.qscale" for n in plain)])
    ours = {g.name: g for g in dequantize_grids(read_vdb(tmp_path / "q.vdb")[0], "ours")}
    for g in dequantize_grids(theirs, "openvdb"):
        a, b = np.argsort(voxel_keys(g.coords)), np.argsort(voxel_keys(ours[g.name].coords))
        np.testing.assert_array_equal(g.values[a], ours[g.name].values[b])


def test_vdb_print_reads_an_adapter(tmp_path, openvdb):
    ad = rosa_adapter(2)
    path = tmp_path / "a.vdb"
    write_adapter_vdb(path, ad, CFG, quantize="int8")
    run = subprocess.run(["vdb_print", "-l", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "ERROR" not in run.stderr, run.stderr
    assert "hyprjax_adapter: 2" in run.stdout and "quantization: int8" in run.stdout
    names = re.findall(r"^Name: (.*)$", run.stdout, re.M)
    counts = [int(c.replace(",", "")) for c in re.findall(r"Number of active voxels:\s+([\d,]+)", run.stdout)]
    grids, _ = read_vdb(path)
    assert dict(zip(names, counts)) == {g.name: len(g.coords) for g in grids}
    assert {"q_proj", "q_proj.qscale", "up_proj.lora_B", "up_proj.lora_B.qscale"} <= set(names)


# ---------------------------------------------------------------- convert / info, through the CLI

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny qwen3 (HF directory), a PEFT LoRA and a PEFT SHiRA adapter on it."""
    from tests.tiny_models import make_hf_model

    peft = need("peft")
    torch = need("torch")
    from tests.adapters.peft_models import make_peft_adapter

    d = tmp_path_factory.mktemp("convert")
    hf = make_hf_model(d / "base", "qwen3", vocab_size=400)
    make_peft_adapter(hf, d / "lora", seed=1, r=4, alpha=8, rank_pattern={"down_proj": 2})
    torch.manual_seed(2)
    shira = peft.get_peft_model(copy.deepcopy(hf), peft.ShiraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                                     init_weights=False, random_seed=2))
    with torch.no_grad():
        for name, p in shira.named_parameters():
            if "shira_weight" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    shira.save_pretrained(d / "shira")
    from hyprjax.formats.load import read_config

    return dict(dir=d, hf=hf, cfg=read_config(d / "base")[0], model=str(d / "base"))


def run_cli(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli(["adapters", *map(str, args)])
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def same_deltas(a: LoraAdapter, b: LoraAdapter, tol: float = 0.0) -> None:
    keys = {*a.modules, *a.sparse}
    assert keys == {*b.modules, *b.sparse}
    for key in keys:
        np.testing.assert_allclose(b.delta(*key), a.delta(*key), rtol=0, atol=tol)


def test_peft_lora_to_vdb_to_peft_is_exact(world, tmp_path):
    from hyprjax.adapters.load import read_adapter

    m = world["model"]
    assert run_cli("convert", world["dir"] / "lora", tmp_path / "a.vdb", "--model", m)[0] == 0
    assert run_cli("convert", tmp_path / "a.vdb", tmp_path / "back", "--model", m)[0] == 0
    src = read_adapter(world["dir"] / "lora", "lora", world["cfg"])
    same_deltas(src, read_adapter(tmp_path / "a.vdb", "a", world["cfg"]), 1e-7)
    back = read_adapter(tmp_path / "back", "back", world["cfg"])
    same_deltas(src, back, 1e-7)
    assert {k: m.rank for k, m in back.modules.items()} == {k: m.rank for k, m in src.modules.items()}
    # Quantized on the way: int8 holds the deltas to a percent of their size.
    assert run_cli("convert", world["dir"] / "lora", tmp_path / "q.vdb", "--model", m, "--quantize", "int8")[0] == 0
    same_deltas(src, read_adapter(tmp_path / "q.vdb", "q", world["cfg"]),
                0.02 * max(np.abs(src.delta(*k)).max() for k in src.modules))


def test_shira_to_vdb_to_shira_loads_in_peft(world, tmp_path):
    from hyprjax.adapters.load import read_adapter

    peft, torch = need("peft"), need("torch")
    m = world["model"]
    assert run_cli("convert", world["dir"] / "shira", tmp_path / "s.vdb", "--model", m, "--half")[0] == 0
    assert run_cli("convert", world["dir"] / "shira", tmp_path / "s32.vdb", "--model", m)[0] == 0
    assert run_cli("convert", tmp_path / "s32.vdb", tmp_path / "back", "--model", m)[0] == 0
    src = read_adapter(world["dir"] / "shira", "s", world["cfg"])
    back = read_adapter(tmp_path / "back", "b", world["cfg"])
    assert back.kind == "shira"
    same_deltas(src, back)
    half = read_adapter(tmp_path / "s.vdb", "h", world["cfg"])
    same_deltas(src, half, max(np.abs(m.values).max() for m in src.sparse.values()) * 2 ** -11)  # half's step
    # PEFT itself loads the re-written directory and computes what the original computes.
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(copy.deepcopy(world["hf"]), world["dir"] / "shira")(ids).logits
        got = peft.PeftModel.from_pretrained(copy.deepcopy(world["hf"]), tmp_path / "back")(ids).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)


def test_lora_to_gguf_and_back(world, tmp_path):
    from hyprjax.adapters.load import read_adapter

    gguf = need("gguf")
    m = world["model"]
    assert run_cli("convert", world["dir"] / "lora", tmp_path / "a.gguf", "--model", m)[0] == 0
    src = read_adapter(world["dir"] / "lora", "lora", world["cfg"])
    same_deltas(src, read_adapter(tmp_path / "a.gguf", "a", world["cfg"]), 1e-7)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")  # the gguf package's own reader
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    # And on to .vdb (int4) and an F16 / Q8_0 GGUF.
    assert run_cli("convert", tmp_path / "a.gguf", tmp_path / "a.vdb", "--model", m, "--quantize", "int4")[0] == 0
    assert run_cli("convert", tmp_path / "a.gguf", tmp_path / "h.gguf", "--model", m, "--half")[0] == 0
    assert run_cli("convert", tmp_path / "a.gguf", tmp_path / "q.gguf", "--model", m, "--quantize", "int8")[0] == 0
    scale = max(np.abs(src.delta(*k)).max() for k in src.modules)
    same_deltas(src, read_adapter(tmp_path / "h.gguf", "h", world["cfg"]), 2e-3 * scale)
    same_deltas(src, read_adapter(tmp_path / "q.gguf", "q", world["cfg"]), 2e-2 * scale)


def test_info(world, tmp_path):
    m = world["model"]
    run_cli("convert", world["dir"] / "lora", tmp_path / "q.vdb", "--model", m, "--quantize", "int8")
    info = adapter_info(str(tmp_path / "q.vdb"), world["cfg"])
    assert info["kind"] == "lora" and info["format"] == "vdb" and info["rank"] == 4
    assert info["dtype"].startswith("int8 codes") and info["file bytes"] > 0 and info["memory bytes"] > 0
    assert "q_proj x2" in info["modules"] and "down_proj x2" in info["modules"]
    rc, out, err = run_cli("info", world["dir"] / "shira", "--model", m)
    assert rc == 0 and "shira" in out and "F32" in out and "sparse density" in out, err
    rc, out, _ = run_cli("info", world["dir"] / "lora", "--model", m, "--json")
    assert rc == 0 and '"kind": "lora"' in out


@pytest.mark.parametrize("case", ["sparse-to-gguf", "int4-gguf", "half-peft", "missing-src", "exists", "no-model",
                                  "bad-vdb", "other-model"])
def test_cli_errors_are_one_line(world, tmp_path, case):
    m, d = world["model"], world["dir"]
    (tmp_path / "there.vdb").write_bytes(b"x")
    (tmp_path / "junk.vdb").write_bytes(b"not a vdb file at all")
    other = ModelConfig(arch="qwen3", vocab_size=400, hidden_size=64, intermediate_size=96, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=24, tie_word_embeddings=True)
    if case == "other-model":
        big = LoraAdapter("x", "", {(0, "q_proj"): LoraModule(np.ones((64, 2), np.float32),
                                                              np.ones((2, 96), np.float32), 1.0)})
        write_adapter_vdb(tmp_path / "other.vdb", big, other)
    args, why = {
        "sparse-to-gguf": (["convert", d / "shira", tmp_path / "x.gguf", "--model", m], "holds low-rank modules only"),
        "int4-gguf": (["convert", d / "lora", tmp_path / "x.gguf", "--model", m, "--quantize", "int4"], "int4 is for"),
        "half-peft": (["convert", d / "lora", tmp_path / "out", "--model", m, "--half"], "written in float32"),
        "missing-src": (["convert", tmp_path / "nope", tmp_path / "x.vdb", "--model", m], "does not exist"),
        "exists": (["convert", d / "lora", tmp_path / "there.vdb", "--model", m], "pass --force"),
        "no-model": (["info", d / "lora", "--model", tmp_path / "nomodel"], "no such file or directory"),
        "bad-vdb": (["info", tmp_path / "junk.vdb", "--model", m], "neither a PEFT directory"),
        "other-model": (["info", tmp_path / "other.vdb", "--model", m], "not this base model"),
    }[case]
    rc, out, err = run_cli(*args)
    assert rc == 2 and "Traceback" not in err and why in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hyprjax: error: ")


def test_modules_needing_different_alphas_go_to_gguf_with_scales_folded(world, tmp_path):
    """An extraction keeps scale 1 at every rank, so scale * rank (llama.cpp's alpha) differs per module."""
    from hyprjax.adapters.load import read_adapter

    rng = np.random.default_rng(5)
    shapes = module_shapes(world["cfg"])
    ad = LoraAdapter("x", "", {(0, n): LoraModule(rng.standard_normal((shapes[n][0], r)).astype(np.float32),
                                                  rng.standard_normal((r, shapes[n][1])).astype(np.float32), 1.0)
                               for n, r in (("q_proj", 2), ("v_proj", 5), ("down_proj", 3))})
    write_adapter_vdb(tmp_path / "x.vdb", ad, world["cfg"])
    assert run_cli("convert", tmp_path / "x.vdb", tmp_path / "x.gguf", "--model", world["model"])[0] == 0
    same_deltas(ad, read_adapter(tmp_path / "x.gguf", "x", world["cfg"]), 1e-5)
