"""Sparse adapters (SHiRA, block-sparse, low-rank + sparse) through the model and the engine,
against PEFT's ShiraModel and against deltas merged into the weights in numpy."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.adapters.peft_models import make_peft_adapter, paged_logits, peft_logits, peft, torch
from tests.adapters.test_lora_engine import ENGINE, GREEDY, _serve
from tests.tiny_models import hf_greedy, hf_logits, make_hf_model
from hyprjax.adapters.load import read_adapter
from hyprjax.adapters.lora import AdapterError, LoraAdapter, module_shapes
from hyprjax.adapters.peft import write_peft
from hyprjax.adapters.registry import LoraRegistry, LoraRequest, sparse_capacity
from hyprjax.adapters.sparse import SparseModule, blocks_from_dense, sparse_from_dense
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.formats.load import load_model
from hyprjax.kernels.lora import widen

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_shira(hf_model, out_dir, *, seed: int, r: int, targets=ALL, magnitude: float = 0.3):
    """A PEFT ShiraModel over a copy of `hf_model` with random nonzero values, saved to out_dir."""
    torch.manual_seed(seed)
    config = peft.ShiraConfig(r=r, target_modules=list(targets), init_weights=False, random_seed=seed)
    model = peft.get_peft_model(copy.deepcopy(hf_model), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "shira_weight" in name:
                p.copy_(torch.randn_like(p) * magnitude)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def _random_blocks(cfg, seed: int, name: str = "blocks", nblocks: int = 3, b: int = 16,
                   magnitude: float = 0.05) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    sparse = {}
    for layer in range(cfg.num_layers):
        for module in ("q_proj", "o_proj", "up_proj", "down_proj"):
            din, dout = module_shapes(cfg)[module]
            sparse[(layer, module)] = blocks_from_dense(rng.standard_normal((din, dout)) * magnitude, nblocks, b)
    return LoraAdapter(name, "", {}, sparse=sparse)


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def world(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(f"sparse-{arch}")
    hf = make_hf_model(d / "base", arch, vocab_size=400)
    lm = load_model(d / "base", with_tokenizer=False, progress=False)
    shira = make_shira(hf, d / "shira", seed=1, r=2)
    lora_peft = make_peft_adapter(hf, d / "lora", seed=2, r=4, alpha=8, magnitude=0.15)
    lora = read_adapter(d / "lora", "lora", lm.cfg)
    rng = np.random.default_rng(3)
    rosa_sparse = {}
    for (layer, name) in lora.modules:
        din, dout = module_shapes(lm.cfg)[name]
        rosa_sparse[(layer, name)] = sparse_from_dense(rng.standard_normal((din, dout)) * 0.2, 40)
    adapters = {"shira": read_adapter(d / "shira", "shira", lm.cfg), "lora": lora,
                "blocks": _random_blocks(lm.cfg, 4),
                "rosa": LoraAdapter("rosa", "", dict(lora.modules), sparse=rosa_sparse)}
    return dict(dir=d, arch=arch, hf=hf, lm=lm, shira_peft=shira, lora_peft=lora_peft, adapters=adapters)


def _registry(world, names, dtype=np.float32, bits16=False):
    sparse_rank, block_rank = sparse_capacity([world["adapters"][n] for n in names], world["lm"].cfg)
    reg = LoraRegistry(world["lm"].cfg, max_loras=4, max_rank=8, dtype=dtype, max_sparse_rank=sparse_rank,
                       max_block_rank=block_rank, bits16=bits16)
    for n in names:
        reg.add(world["adapters"][n])
    assert reg.acquire(names)
    return reg


def _merged_model(world, weighted: dict[str, float]):
    """A fresh load of the base model with sum_i w_i * delta_i added to its weights in numpy."""
    lm = load_model(world["dir"] / "base", with_tokenizer=False, progress=False)
    for name, w in weighted.items():
        adapter = world["adapters"][name]
        for layer, mod in {*adapter.modules, *adapter.sparse}:
            delta = np.float32(w) * adapter.delta(layer, mod).astype(np.float32)
            stacked = not isinstance(lm.model.layers, nnx.List)
            layer_module = lm.model.layers if stacked else lm.model.layers[layer]
            block = layer_module.attn if mod in ALL[:4] else layer_module.mlp
            kernel = getattr(block, mod).kernel
            value = np.array(kernel[...])
            value[layer if stacked else slice(None)] += delta
            kernel[...] = value
    return lm


def test_shira_logits_and_greedy_tokens_equal_peft(world):
    lm, pm = world["lm"], world["shira_peft"]
    assert world["adapters"]["shira"].kind == "shira"
    prompt = list(range(5, 43))
    reg = _registry(world, ["shira"])
    ours = paged_logits(lm, prompt, reg, ((reg.slot("shira"), 1.0),))
    ref = peft_logits(pm, prompt)
    assert np.abs(ref - hf_logits(world["hf"], prompt)).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(max_loras=2, max_lora_rank=8, max_sparse_rank=2, **ENGINE),
                    warmup=False, progress=False)
    eng.add_adapter(world["adapters"]["shira"])
    tokens = _serve(eng, [(prompt, LoraRequest.make(["shira"]))])[0]
    assert tokens == hf_greedy(pm, prompt, GREEDY.max_tokens)


def test_written_shira_dir_loads_in_peft_with_the_same_logits(world, tmp_path):
    adapter = world["adapters"]["shira"]
    write_peft(tmp_path / "out", adapter, world["lm"].cfg)
    again = read_adapter(tmp_path / "out", "again", world["lm"].cfg)
    for key, m in adapter.sparse.items():
        np.testing.assert_array_equal(again.sparse[key].values, m.values)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(world["hf"]), str(tmp_path / "out")).eval()
    prompt = list(range(9, 30))
    np.testing.assert_allclose(peft_logits(loaded, prompt), peft_logits(world["shira_peft"], prompt), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", ["blocks", "rosa"])
def test_block_and_low_rank_plus_sparse_equal_merged_weights(world, name):
    prompt = list(range(7, 40))
    reg = _registry(world, [name])
    ours = paged_logits(world["lm"], prompt, reg, ((reg.slot(name), 1.0),))
    ref = paged_logits(_merged_model(world, {name: 1.0}), prompt)
    assert np.abs(ref - paged_logits(world["lm"], prompt)).max() > 0.05
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_weighted_mix_of_every_kind_equals_merged_weights(world):
    prompt = list(range(7, 40))
    mix = {"lora": 0.7, "shira": -0.5, "blocks": 1.3, "rosa": 0.4}
    reg = _registry(world, list(mix))
    ours = paged_logits(world["lm"], prompt, reg, tuple((reg.slot(n), w) for n, w in mix.items()))
    np.testing.assert_allclose(ours, paged_logits(_merged_model(world, mix), prompt), atol=1e-4, rtol=0)


def _engine(world, names, max_loras: int, **settings):
    """An engine with `max_loras` slots, tables sized for the adapters `names`, holding them."""
    adapters = [world["adapters"][n] for n in names]
    sparse_rank, block_rank = sparse_capacity(adapters, world["lm"].cfg)
    eng = LLMEngine(world["lm"].model, world["lm"].cfg, None,
                    EngineConfig(max_loras=max_loras, max_lora_rank=8, max_sparse_rank=sparse_rank,
                                 max_block_rank=block_rank, **ENGINE, **settings), warmup=False, progress=False)
    for a in adapters:
        eng.add_adapter(a)
    return eng


@pytest.fixture(scope="module")
def engine(world):
    return _engine(world, world["adapters"], 4)


def test_mixed_batch_of_kinds_equals_each_request_alone(world, engine):
    rng = np.random.default_rng(0)
    mixes = [LoraRequest.make(["lora"]), LoraRequest.make(["shira"]), LoraRequest.make(["blocks"]),
             LoraRequest.make(["rosa"]), LoraRequest.make(["shira", "blocks", "lora"], [0.6, -0.8, 0.5]),
             None, LoraRequest.make(["rosa", "shira"], {"rosa": 1.2, "shira": 0.3})]
    prompts = [rng.integers(3, 400, int(rng.integers(4, 40))).tolist() for _ in mixes]
    stats = {}
    together = _serve(engine, list(zip(prompts, mixes)), stats)
    assert stats["max_running"] == len(mixes)
    alone = [_serve(engine, [(p, m)])[0] for p, m in zip(prompts, mixes)]
    assert together == alone
    base = _serve(engine, [(p, None) for p in prompts])
    assert sum(t != b for t, b in zip(together, base)) >= 4


def test_bfloat16_slot_tables_hold_the_rounded_values_and_serve_mixed_batches(world):
    """adapter_dtype="bfloat16": on the XLA path the tables are uint16 bits (kernels/lora.py), half
    the bytes, holding exactly the float32 engine's slot values rounded to bf16 (the kernels give
    float32 tables' results for those values, exactly but for block-sparse decode, to float32
    rounding: tests/kernels); a mixed batch equals each alone."""
    names = list(world["adapters"])
    f32, bits = _registry(world, names), _registry(world, names, dtype=jnp.bfloat16, bits16=True)
    index_bytes = sum(t.nbytes for t in jax.tree.leaves(f32.sparse_tables) if t.dtype == jnp.int32)
    assert bits.nbytes - index_bytes == (f32.nbytes - index_bytes) // 2  # values: 2 bytes, not 4
    for part in (None, "sparse", "block"):
        a, b = (f32.tables, bits.tables) if part is None else (f32.sparse_tables[part], bits.sparse_tables[part])
        for m in a:
            for t32, t16 in zip(a[m], b[m]):
                if t32.dtype == jnp.int32:
                    np.testing.assert_array_equal(t16, t32)
                else:
                    assert t16.dtype == jnp.uint16
                    np.testing.assert_array_equal(widen(t16), t32.astype(jnp.bfloat16).astype(jnp.float32))
    eng = _engine(world, names, 4, adapter_dtype="bfloat16")
    assert eng.lora.tables["q_proj"][0].dtype == jnp.uint16
    rng = np.random.default_rng(1)
    mixes = [LoraRequest.make(["lora"]), LoraRequest.make(["shira"]), LoraRequest.make(["blocks"]),
             LoraRequest.make(["rosa"]), LoraRequest.make(["shira", "blocks", "lora"], [0.6, -0.8, 0.5]), None]
    prompts = [rng.integers(3, 400, int(rng.integers(4, 40))).tolist() for _ in mixes]
    together = _serve(eng, list(zip(prompts, mixes)))
    assert together == [_serve(eng, [(p, m)])[0] for p, m in zip(prompts, mixes)]
    assert sum(t != b for t, b in zip(together, _serve(eng, [(p, None) for p in prompts]))) >= 3


def test_sequential_equals_weighted_sum(world, engine):
    prompt = list(range(11, 45))
    names, weights = ["lora", "shira", "blocks"], [0.9, -0.6, 1.1]
    seq = _serve(engine, [(prompt, LoraRequest.make(names, weights, strategy="sequential"))])[0]
    assert seq == _serve(engine, [(prompt, LoraRequest.make(names, weights))])[0]
    assert seq != _serve(engine, [(prompt, None)])[0]
    resolved = engine.lora.resolve(LoraRequest.make(names, weights, strategy="sequential"))
    try:  # the same deltas in the same slots: the same prefix-cache root as weighted_sum
        plain = engine.lora.resolve(LoraRequest.make(names, weights))
        assert resolved.mix == plain.mix and resolved.salt == plain.salt
        engine.lora.release(plain, pinned=False)
    finally:
        engine.lora.release(resolved, pinned=False)


def test_linear_merge_of_sparse_adapters_is_their_weighted_sum(world):
    from hyprjax.adapters.merge import merge_adapters

    a = world["adapters"]["shira"]
    b = LoraAdapter("b", "", {}, sparse={k: SparseModule(m.rows[::-1].copy(), m.cols.copy(), m.values * 2, m.shape)
                                         for k, m in a.sparse.items()})
    merged = merge_adapters([a, b], [0.5, -1.5], "linear", name="m")
    assert merged.kind == "shira"
    for key in a.sparse:
        np.testing.assert_allclose(merged.delta(*key), 0.5 * a.delta(*key) - 1.5 * b.delta(*key), atol=1e-6)
    with pytest.raises(AdapterError, match="sparse adapters merge only with sparse adapters of the same form"):
        merge_adapters([a, world["adapters"]["lora"]], [1.0, 1.0], "linear", name="x")


def test_sparse_adapter_without_table_or_over_capacity_is_refused(world):
    cfg = world["lm"].cfg
    reg = LoraRegistry(cfg, max_loras=1, max_rank=8, dtype=np.float32)
    with pytest.raises(AdapterError, match=r"element-sparse, and this engine has no table for it: start it with "
                                           r"max_sparse_rank"):
        reg.add(world["adapters"]["shira"])
    reg = LoraRegistry(cfg, max_loras=1, max_rank=8, dtype=np.float32, max_sparse_rank=1)
    with pytest.raises(AdapterError, match=r"layer 0 \w+_proj has \d+ entries, more than the slot's \d+ "
                                           r"\(max_sparse_rank .* too small: this module needs 2\)"):
        reg.add(world["adapters"]["shira"])


def test_v1_models_card_says_kind_density_and_bytes(world, engine):
    info = engine.lora.describe("shira")
    a = world["adapters"]["shira"]
    assert info["kind"] == "shira" and info["bytes"] == a.nbytes and info["params"] == a.params
    assert engine.lora.describe("rosa")["kind"] == "lora+sparse"
    assert engine.lora.describe("blocks")["kind"] == "block-sparse"
    # density: trained values over the targeted weights; SHiRA r=2 on all seven modules
    shapes = module_shapes(world["lm"].cfg)
    want = sum(2 * (i + o) for i, o in shapes.values()) / sum(i * o for i, o in shapes.values())
    assert info["density"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name, scan", [("shira", False), ("blocks", False), ("rosa", False), ("rosa", True)])
def test_merged_mode_serves_every_request_as_before_and_unmerges_exactly(world, name, scan):
    """One adapter merged into the weights: its own requests run the base step, the others take it
    back out per token, and every request gets the tokens it got unmerged; unmerge restores each
    kernel bit for bit."""
    import jax

    # a fresh load (merging changes its weights); scan: stacked [L, ...] kernels, as on GPU/TPU
    lm = load_model(world["dir"] / "base", with_tokenizer=False, progress=False, scan_layers=scan)
    adapters = world["adapters"]
    sparse_rank, block_rank = sparse_capacity(list(adapters.values()), lm.cfg)
    eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(max_loras=4, max_lora_rank=8, max_sparse_rank=sparse_rank,
                                                         max_block_rank=block_rank, **ENGINE),
                    warmup=False, progress=False)
    for a in adapters.values():
        eng.add_adapter(a)
    rng = np.random.default_rng(5)
    jobs = [(rng.integers(3, 400, 20).tolist(), m) for m in
            (LoraRequest.make([name]), None, LoraRequest.make(["lora"]), LoraRequest.make([name, "lora"], [0.5, 0.5]))]
    before = _serve(eng, jobs)
    weights = [np.array(a) for a in jax.tree.leaves(eng.runner.state)]
    eng.merge_adapter(name)
    assert eng.lora.merged_into == name
    changed = sum(not np.array_equal(w, np.array(a)) for w, a in zip(weights, jax.tree.leaves(eng.runner.state)))
    touched = {*adapters[name].modules, *adapters[name].sparse}
    assert changed == len({m for _, m in touched} if scan else touched)  # exactly the touched kernels
    steps = eng.runner.pack
    seen = []
    eng.runner.pack = lambda d, p: (seen.append(r.lora for r in d + p), steps(d, p))[1]
    assert _serve(eng, [jobs[0]]) == [before[0]]  # the merged adapter alone: no adapter work at all
    assert all(not lora for rows in seen for lora in rows)
    eng.runner.pack = steps
    assert _serve(eng, jobs) == before
    with pytest.raises(AdapterError, match="merged into the base weights; unmerge it"):
        eng.remove_adapter(name)
    assert eng.unmerge_adapter() == name
    for w, a in zip(weights, jax.tree.leaves(eng.runner.state)):
        np.testing.assert_array_equal(w, np.array(a))
    assert _serve(eng, jobs) == before


def test_llm_grows_sparse_tables_and_keeps_loaded_adapters(world, tmp_path):
    """LLM.load_lora sizes the sparse tables by the adapters it meets: a larger one rebuilds the
    engine with room for it, and the adapters loaded before stay loaded, with the same outputs."""
    from hyprjax import LLM
    from hyprjax.adapters.vdb_adapter import write_adapter_vdb

    cfg = world["lm"].cfg
    small = _random_blocks(cfg, 7, "small", nblocks=1)
    write_adapter_vdb(tmp_path / "small.vdb", small, cfg)
    write_adapter_vdb(tmp_path / "big.vdb", world["adapters"]["blocks"], cfg)
    from bench.make_model import build_tokenizer

    if not (world["dir"] / "base" / "tokenizer.json").exists():  # LLM reads one; the ids below need none
        build_tokenizer(cfg.vocab_size).save(str(world["dir"] / "base" / "tokenizer.json"))
    llm = LLM(world["dir"] / "base", progress=False, max_batch=4, max_model_len=128)
    prompt = list(range(20, 40))
    llm.load_lora("small", tmp_path / "small.vdb")
    assert llm.engine().ecfg.max_block_rank == sparse_capacity([small], cfg)[1]
    first = llm.generate([prompt], GREEDY, lora="small")[0].token_ids
    llm.load_lora("big", tmp_path / "big.vdb")
    assert llm.engine().ecfg.max_block_rank == sparse_capacity([world["adapters"]["blocks"]], cfg)[1] > 1
    assert llm.generate([prompt], GREEDY, lora="small")[0].token_ids == first
    assert llm.generate([prompt], GREEDY, lora="big")[0].token_ids == _serve(
        _engine(world, ["blocks"], 1), [(prompt, LoraRequest.make(["blocks"]))])[0]


def test_a_slot_taken_over_by_another_kind_serves_only_its_new_adapter(world):
    """One slot, adapters of three kinds taking turns in it: a write fills only the new adapter's
    own tables (registry._write_slot), so stale rows of the others stay behind, never read; every
    turn's tokens equal an engine that only ever held that adapter."""
    eng = _engine(world, world["adapters"], 1)
    prompt = list(range(7, 40))
    turns = ["blocks", "lora", "shira", "blocks", "rosa", "lora"]
    got = [_serve(eng, [(prompt, LoraRequest.make([n]))])[0] for n in turns]
    assert eng.lora.evictions == len(turns) - 1
    block_rows = np.asarray(jax.tree.leaves(eng.lora.sparse_tables["block"])[1][:, 0])
    assert block_rows.any()  # "lora" holds the slot; the last block adapter's values stayed
    alone = {n: _serve(_engine(world, [n], 1), [(prompt, LoraRequest.make([n]))])[0] for n in set(turns)}
    assert got == [alone[n] for n in turns]
    assert len({tuple(t) for t in got}) >= 3
