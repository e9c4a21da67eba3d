"""Sparse adapter training (training/sparse.py): SHiRA's loss, value gradients and ten AdamW steps
against PEFT's ShiraModel + torch; the Fisher mask against squared gradients from transformers;
block-sparse and low-rank + sparse runs whose .vdb serves the trained adapter; a SHiRA run's PEFT
directory in PeftModel; O(nnz) optimizer state at Qwen3-0.6B's shape; resume after a crash; the
CLI's sparse options."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyprjax import train
from hyprjax.adapters.load import read_adapter
from hyprjax.adapters.lora import MODULES, LoraAdapter, module_shapes
from hyprjax.adapters.peft import read_peft
from hyprjax.adapters.vdb_adapter import write_adapter_vdb
from hyprjax.cli import main
from hyprjax.config import PRESETS
from hyprjax.formats.load import load_model
from hyprjax.training import trainer
from hyprjax.training.data import pack, read_examples
from hyprjax.training.lora import TrainLora, from_adapter, init_lora
from hyprjax.training.sparse import (fisher_masks, from_modules, init_values, make_layout, mask_shapes, memory_report,
                                     probe_shapes, random_masks, to_modules)
from hyprjax.training.step import loss_sums, make_fisher_step, make_optimizer, make_train_step, schedule_value
from tests.deps import need
from tests.tiny_models import make_hf_model
from tests.training.test_parity import _batch
from tests.training.test_trainer import _data, base  # noqa: F401 (base: the module's tiny model fixture)

torch = need("torch")
peft = need("peft")

R = 2  # PEFT's r: r * (in + out) entries per module


def _shira_setup(tmp_path, arch):
    """A tiny model, and PEFT's random SHiRA mask (init_weights=False: random values, scaled to
    0.05) read back through read_peft as our leaves and masks."""
    hf = make_hf_model(tmp_path / "base", arch)
    loaded = load_model(tmp_path / "base", dtype="float32", with_tokenizer=False, scan_layers=True, progress=False)
    graphdef, base = nnx.split(loaded.model)
    torch.manual_seed(0)
    config = peft.ShiraConfig(r=R, target_modules=list(MODULES), init_weights=False, random_seed=5)
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "shira_weight" in name:
                p.mul_(0.05)
    pm.save_pretrained(tmp_path / "shira")
    params, masks = from_modules(read_peft(tmp_path / "shira", "s", loaded.cfg).sparse, loaded.cfg)
    return loaded.cfg, graphdef, base, params, masks, pm


def _shira_weights(pm):
    """(layer, module) -> (PEFT's shira_weight parameter, its indices [2, nnz])."""
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "shira_weight") and "default" in getattr(mod, "shira_indices", {}):
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(layer, parts[-1])] = (mod.shira_weight["default"], mod.shira_indices["default"].numpy())
    return out


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_shira_one_step_and_ten_adamw_steps_equal_peft(tmp_path, arch):
    cfg, graphdef, base, params, masks, pm = _shira_setup(tmp_path, arch)
    weights = _shira_weights(pm)
    assert len(weights) == cfg.num_layers * len(MODULES)
    for (layer, module), (_, idx) in weights.items():  # read_peft's masks are PEFT's, in PEFT's order
        np.testing.assert_array_equal(np.asarray(masks[module]["rows"][layer]), idx[0])
        np.testing.assert_array_equal(np.asarray(masks[module]["cols"][layer]), idx[1])

    batch, ids, labels = _batch(cfg)

    def loss(params):
        s, n = loss_sums(params, base, graphdef, batch, scale=1.0, masks=masks)
        return s / n

    ours, grads = jax.value_and_grad(loss)(params)
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    assert abs(float(ours) - out.loss.item()) <= 1e-5, (float(ours), out.loss.item())
    for (layer, module), (p, _) in weights.items():
        want, got = p.grad.numpy(), np.asarray(grads[module]["values"][layer])
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), (layer, module)

    lr, steps, warmup, wd, clip = 3e-3, 10, 3, 0.01, 0.5
    opt = make_optimizer(lr, steps, warmup=warmup, weight_decay=wd, clip=clip)
    step = make_train_step(graphdef, opt, scale=1.0)
    start = jax.tree.map(np.asarray, params)
    state = opt.init(params)
    tparams = [p for p, _ in weights.values()]
    topt = torch.optim.AdamW(tparams, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    for k in range(steps):
        batch, ids, labels = _batch(cfg, seed=10 + k)
        params, state, _ = step(params, state, base, {n: v[None] for n, v in batch.items()}, masks)
        for g in topt.param_groups:
            g["lr"] = schedule_value(lr, steps, warmup, k)
        topt.zero_grad()
        pm(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(tparams, clip)
        topt.step()
    for (layer, module), (p, _) in weights.items():
        got = np.asarray(params[module]["values"][layer])
        np.testing.assert_allclose(got, p.detach().numpy(), rtol=0, atol=1e-4, err_msg=f"{layer} {module}")
        assert np.abs(got - start[module]["values"][layer]).max() > 1e-3  # it did train


def _torch_scores(hf, batches) -> dict:
    """(layer, module) -> sum over batches of transformers' squared weight gradient [out, in]."""
    out = {}
    for ids, labels in batches:
        hf.zero_grad()
        hf(input_ids=ids, labels=labels).loss.backward()
        for name, mod in hf.named_modules():
            if name.split(".")[-1] in MODULES:
                parts = name.split(".")
                key = (int(parts[parts.index("layers") + 1]), parts[-1])
                out[key] = out.get(key, 0.0) + mod.weight.grad.double().numpy() ** 2
    return out


@pytest.mark.parametrize("block", [0, 16])
def test_fisher_mask_keeps_the_largest_accumulated_squared_gradients(tmp_path, block):
    """Our warm-up's scores equal transformers' summed squared weight gradients, and the mask
    keeps the top entries (or b x b blocks by summed score) of them."""
    hf = make_hf_model(tmp_path, "qwen3")
    loaded = load_model(tmp_path, dtype="float32", with_tokenizer=False, scan_layers=True, progress=False)
    cfg = loaded.cfg
    graphdef, base = nnx.split(loaded.model)
    kind = "block-sparse" if block else "shira"
    layout = make_layout(cfg, MODULES, kind, rank=R, density=0.2 if block else None, block=block or None)
    probes = probe_shapes(cfg, MODULES)
    step = make_fisher_step(graphdef, probes, scale=1.0)
    scores = {m: jnp.zeros(s, jnp.float32) for m, s in probes.items()}
    batches = []
    for k in range(3):
        batch, ids, labels = _batch(cfg, seed=20 + k)
        scores = step(scores, {}, base, {n: v[None] for n, v in batch.items()})
        batches.append((ids, labels))
    scores = jax.device_get(scores)
    masks = fisher_masks(scores, layout)
    want = _torch_scores(hf, batches)
    for (layer, module), w in want.items():
        got = scores[module][layer].T
        np.testing.assert_allclose(got, w, rtol=1e-3, atol=1e-6 * w.max(), err_msg=f"{layer} {module}")
        if block:
            b = block
            w = w.reshape(w.shape[0] // b, b, w.shape[1] // b, b).sum(axis=(1, 3))
            rows, cols = (np.asarray(masks[module][k][layer]) for k in ("row_blk", "col_blk"))
        else:
            rows, cols = (np.asarray(masks[module][k][layer]) for k in ("rows", "cols"))
        n = layout.sizes[module]
        assert len(rows) == n and len(set(zip(rows.tolist(), cols.tolist()))) == n
        kept = np.zeros(w.shape, bool)
        kept[rows, cols] = True
        assert w[kept].min() >= w[~kept].max() * (1 - 1e-4), (layer, module)


def _eval_loss(d, held, adapter, seq_len=48):
    """Mean eval loss of `adapter` (a host LoraAdapter) over the packed eval rows, as train() measures it."""
    loaded = load_model(d, dtype="float32", progress=False, scan_layers=True)
    graphdef, base = nnx.split(loaded.model)
    packed = pack(read_examples(str(held), loaded.tokenizer), seq_len, 0)
    params, scale = from_adapter(adapter, loaded.cfg) if adapter.modules else ({}, 1.0)
    sparse, masks = from_modules(adapter.sparse, loaded.cfg)
    params = {m: {**params.get(m, {}), **sparse.get(m, {})} for m in {*params, *sparse}}
    s, n = loss_sums(params, base, graphdef, packed.rows(np.arange(packed.num_rows)), scale=scale, masks=masks)
    return float(s / n)


RUN = dict(steps=16, rank=2, lr=2e-2, batch_size=2, seq_len=48, warmup=2, mask_warmup=2, progress=False)


@pytest.mark.parametrize("kind", ["block-sparse", "lora+sparse"])
def test_block_and_low_rank_plus_sparse_train_and_their_vdb_serves_the_trained_adapter(tmp_path, base, kind):
    d, _ = base
    data, held = _data(tmp_path)
    out = tmp_path / "run"
    result = train(str(d), str(data), str(out), eval=str(held), adapter=kind, density=0.1, **RUN)
    assert result.eval_loss < 0.7 * result.initial_eval_loss
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[1]["loss"]
    assert result.files == (out / "adapter.vdb",) and not (out / "adapter").exists()
    assert json.loads((out / "train_config.json").read_text())["memory"] == result.memory
    adapter = read_adapter(out / "adapter.vdb", "t", load_model(d, progress=False, with_tokenizer=False).cfg)
    assert adapter.kind == kind
    # The file holds the trained adapter: through our seam it gives the run's final eval loss.
    assert abs(_eval_loss(d, held, adapter) - result.eval_loss) <= 1e-5


def test_shira_run_writes_a_peft_directory_that_peft_loads(tmp_path, base):
    """A SHiRA run (density mapped to PEFT's r, Fisher mask): PeftModel loads OUT/adapter and
    gives the logits our model gives with OUT/adapter.vdb."""
    d, hf = base
    data, held = _data(tmp_path)
    out = tmp_path / "run"
    result = train(str(d), str(data), str(out), eval=str(held), adapter="shira", density=0.05, **RUN)
    assert result.eval_loss < 0.7 * result.initial_eval_loss
    assert result.files == (out / "adapter", out / "adapter.vdb")
    loaded = load_model(d, dtype="float32", progress=False, scan_layers=True)
    vdb = read_adapter(out / "adapter.vdb", "v", loaded.cfg)
    peft_dir = read_adapter(out / "adapter", "p", loaded.cfg)
    assert vdb.kind == peft_dir.kind == "shira"
    for key, m in vdb.sparse.items():
        np.testing.assert_array_equal(peft_dir.sparse[key].values, m.values)
    ids = loaded.tokenizer.encode("Where does Alba keep the key? ")
    params, masks = from_modules(vdb.sparse, loaded.cfg)
    ours = np.asarray(loaded.model(np.asarray([ids], np.int32), np.arange(len(ids), dtype=np.int32)[None],
                                   adapter=TrainLora(params, 1.0, masks))[0][0])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out / "adapter").eval()
    with torch.no_grad():
        want = pm(torch.tensor([ids])).logits[0].numpy()
        plain = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-4)
    assert np.abs(plain - want).max() > 0.1


@pytest.mark.parametrize("kind", ["shira", "block-sparse"])
def test_vdb_round_trip_keeps_leaves_and_masks(tmp_path, kind):
    """to_modules -> .vdb -> read_adapter -> from_modules gives back the same leaves and masks."""
    cfg = PRESETS["tiny"]
    layout = make_layout(cfg, MODULES, kind, rank=2, density=0.1, block=None)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), init_values(cfg, layout))
    masks = random_masks(cfg, layout, seed=3)
    adapter = LoraAdapter("t", "", {}, sparse=to_modules(params, masks, cfg))
    write_adapter_vdb(tmp_path / "a.vdb", adapter, cfg)
    back, back_masks = from_modules(read_adapter(tmp_path / "a.vdb", "t", cfg).sparse, cfg)
    jax.tree.map(np.testing.assert_array_equal, (back, back_masks), (params, masks))


@pytest.mark.parametrize("kind", ["shira", "block-sparse", "lora+sparse"])
def test_optimizer_state_is_o_nnz_at_qwen3_0_6b_shape(kind):
    """AdamW's state over the leaves holds 2 x the trained values (plus step counters), nothing
    weight-shaped: counted on abstract arrays of the real Qwen3-0.6B shape at 1% density."""
    cfg = PRESETS["qwen3-0.6b"]
    layout = make_layout(cfg, MODULES, kind, rank=16, density=0.01, block=None)
    lora = jax.eval_shape(lambda: init_lora(cfg, 16, MODULES, jax.random.key(0))) if kind == "lora+sparse" else {}
    params = {m: {**lora.get(m, {}), **v} for m, v in jax.eval_shape(lambda: init_values(cfg, layout)).items()}
    state = jax.eval_shape(make_optimizer(1e-3, 10, warmup=0, weight_decay=0.0, clip=1.0).init, params)
    n = sum(x.size for x in jax.tree.leaves(params))
    floats = [x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sum(floats) == 2 * n
    smallest_weight = min(i * o for i, o in module_shapes(cfg).values())
    assert max(floats) // cfg.num_layers < smallest_weight / 20  # per layer: nothing near a weight's size
    report = memory_report(cfg, MODULES, lora_rank=16 if kind == "lora+sparse" else 0, layout=layout)
    assert report["trainable_values"] == n
    masked = jax.eval_shape(lambda: mask_shapes(cfg, layout))
    assert report["compact_state_bytes"] == 12 * n + sum(x.size * 4 for x in jax.tree.leaves(masked))
    assert report["dense_masked_state_bytes"] > 20 * report["compact_state_bytes"]


def test_a_crashed_sparse_run_resumes_to_the_uninterrupted_adapter(tmp_path, base, monkeypatch):
    """lora+sparse: the resumed run takes its masks from the checkpoint (choosing them again
    fails here) and ends where the uninterrupted run does."""
    d, _ = base
    data, _ = _data(tmp_path)
    opts = {**RUN, "steps": 8, "adapter": "lora+sparse", "density": 0.1, "mask": "random"}
    whole = train(str(d), str(data), str(tmp_path / "whole"), save_every=3, **opts)

    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(str(d), str(data), str(tmp_path / "crashed"), save_every=3, callback=crash, **opts)

    def chosen_again(*args, **kwargs):
        raise AssertionError("a resumed run chose its masks again")

    monkeypatch.setattr(trainer, "random_masks", chosen_again)
    monkeypatch.setattr(trainer, "_fisher_warmup", chosen_again)
    resumed = train(str(d), str(data), str(tmp_path / "crashed"), save_every=3, resume=True, **opts)
    assert resumed.steps == whole.steps
    cfg = load_model(d, progress=False, with_tokenizer=False).cfg
    a = read_adapter(tmp_path / "whole" / "adapter.vdb", "a", cfg)
    b = read_adapter(tmp_path / "crashed" / "adapter.vdb", "b", cfg)
    assert a.sparse.keys() == b.sparse.keys() and a.modules.keys() == b.modules.keys()
    for key, m in a.sparse.items():
        np.testing.assert_array_equal(b.sparse[key].rows, m.rows)
        np.testing.assert_allclose(b.sparse[key].values, m.values, rtol=0, atol=1e-6)
    for key, m in a.modules.items():
        np.testing.assert_allclose(b.modules[key].delta(), m.delta(), rtol=0, atol=1e-6)


def test_cli_trains_a_sparse_kind_and_names_bad_sparse_options(tmp_path, base, capsys):
    d, _ = base
    data, _ = _data(tmp_path)
    args = ["train", str(d), "--data", str(data), "--steps", "2", "--seq-len", "48", "--rank", "2"]
    assert main(args + ["--out", str(tmp_path / "a"), "--density", "0.1"]) == 2
    assert "--density and --block apply to the sparse kinds" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "b"), "--adapter", "block-sparse", "--block", "32"]) == 2
    assert "--block 32 does not divide k_proj [48 x 64]" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(args + ["--out", str(tmp_path / "c"), "--adapter", "block-sparse", "--density", "0.1",
                        "--mask", "random"]) == 0
    assert f"adapter: {tmp_path / 'c' / 'adapter.vdb'}" in capsys.readouterr().out
