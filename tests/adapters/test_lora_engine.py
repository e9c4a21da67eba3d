"""Adapters through the model and the engine, against PEFT and numpy-merged weights."""

from __future__ import annotations

import copy

import jax
import numpy as np
from flax import nnx
import pytest

from tests.adapters.peft_models import make_peft_adapter, paged_logits, peft_logits
from tests.tiny_models import hf_logits, make_hf_model
from hyprjax.adapters.load import read_adapter
from hyprjax.adapters.lora import AdapterError
from hyprjax.adapters.registry import AdapterNotFoundError, LoraRegistry, LoraRequest
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.formats.load import load_model
from hyprjax.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
ENGINE = dict(max_num_seqs=16, max_num_batched_tokens=64, max_prefill_seqs=4, page_size=8, max_model_len=256,
              block_q=8, num_pages=160)
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Qwen3, four PEFT adapters of different shapes of config, and our reads of them."""
    d = tmp_path_factory.mktemp("lora")
    hf = make_hf_model(d / "base", "qwen3", vocab_size=400)
    lm = load_model(d / "base", with_tokenizer=False, progress=False)
    specs = {
        "a": dict(seed=1, r=8, alpha=16),
        "b": dict(seed=2, r=8, alpha=8, rslora=True, targets=ATTN),
        "c": dict(seed=3, r=4, alpha=4, targets=MLP, alpha_pattern={"down_proj": 12}),
        "d": dict(seed=4, r=16, alpha=32, rank_pattern={"q_proj": 2}, targets=("q_proj", "v_proj", "down_proj")),
    }
    peft_models = {n: make_peft_adapter(hf, d / n, magnitude=0.15, **kw) for n, kw in specs.items()}
    adapters = {n: read_adapter(d / n, n, lm.cfg) for n in specs}
    return dict(dir=d, hf=hf, lm=lm, peft=peft_models, adapters=adapters)


def _registry(world, names, max_loras=4):
    reg = LoraRegistry(world["lm"].cfg, max_loras=max_loras, max_rank=16, dtype=np.float32)
    for n in names:
        reg.add(world["adapters"][n])
    assert reg.acquire(names)
    return reg


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
def test_adapter_logits_equal_peft_and_its_merged_weights(world, name):
    lm, pm = world["lm"], world["peft"][name]
    prompt = list(range(5, 43))
    reg = _registry(world, [name])
    ours = paged_logits(lm, prompt, reg.tables, ((reg.slot(name), 1.0),))
    ref = peft_logits(pm, prompt)
    base = hf_logits(world["hf"], prompt)
    assert np.abs(ref - base).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    merged = copy.deepcopy(pm).merge_and_unload()  # merge_and_unload changes the model it is called on
    np.testing.assert_allclose(ours, hf_logits(merged, prompt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["a", "c"])
def test_the_same_adapter_as_a_llamacpp_gguf_gives_the_same_logits(world, name, tmp_path):
    """Written with write_gguf_lora (llama.cpp's layout, checked against llama.cpp itself in
    test_gguf_lora.py), read back through read_adapter: logits equal PEFT's."""
    from hyprjax.adapters.gguf_lora import write_gguf_lora

    lm = world["lm"]
    path = tmp_path / f"{name}.gguf"
    write_gguf_lora(path, world["adapters"][name], lm.cfg, alpha=0.0 if name == "c" else None)  # c: two scales
    adapter = read_adapter(path, name, lm.cfg, max_rank=16)
    reg = LoraRegistry(lm.cfg, max_loras=1, max_rank=16, dtype=np.float32)
    reg.add(adapter)
    assert reg.acquire([name])
    prompt = list(range(9, 50))
    np.testing.assert_allclose(paged_logits(lm, prompt, reg.tables, ((0, 1.0),)),
                               peft_logits(world["peft"][name], prompt), atol=1e-4, rtol=0)


def _merged_model(world, weighted: dict[str, float]):
    """A fresh load of the base model with sum_i w_i * delta_i added to its weights in numpy."""
    lm = load_model(world["dir"] / "base", with_tokenizer=False, progress=False)
    for name, w in weighted.items():
        for (layer, mod), m in world["adapters"][name].modules.items():
            delta = np.float32(w) * m.delta().astype(np.float32)
            stacked = not isinstance(lm.model.layers, nnx.List)  # [L, din, dout] (GPU/TPU) or one per layer (CPU)
            layer_module = lm.model.layers if stacked else lm.model.layers[layer]
            kernel = getattr(layer_module.attn if mod in ATTN else layer_module.mlp, mod).kernel
            value = np.array(kernel[...])
            value[layer if stacked else slice(None)] += delta
            kernel[...] = value
    return lm


def test_weighted_sum_equals_weights_merged_in_numpy(world):
    prompt = list(range(7, 40))
    reg = _registry(world, ["a", "b", "c"])
    mix = {"a": 0.7, "b": -0.4, "c": 1.3}
    ours = paged_logits(world["lm"], prompt, reg.tables, tuple((reg.slot(n), w) for n, w in mix.items()))
    ref = paged_logits(_merged_model(world, mix), prompt)
    assert np.abs(ref - paged_logits(world["lm"], prompt)).max() > 0.05
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def engine(world):
    eng = LLMEngine(world["lm"].model, world["lm"].cfg, None, EngineConfig(max_loras=4, max_lora_rank=16, **ENGINE),
                    warmup=False, progress=False)
    for n in "abcd":
        eng.add_adapter(world["adapters"][n])
    return eng


def _serve(engine, jobs, stats=None):
    """jobs: [(prompt, LoraRequest | None)] added at once -> token lists, in order. `stats` (a
    dict) gets the most sequences that ran in one step."""
    ids = [engine.add_request(p, GREEDY, lora=lr) for p, lr in jobs]
    out = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        if stats is not None:
            stats["max_running"] = max(stats.get("max_running", 0), engine.scheduler.num_running)
    return [out[rid] for rid in ids]


def _small_engine(world, names, max_loras=2):
    lm = world["lm"]
    eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(max_loras=max_loras, max_lora_rank=16, **ENGINE),
                    warmup=False, progress=False)
    for n in names:
        eng.add_adapter(world["adapters"][n])
    return eng


def test_heterogeneous_batch_equals_each_request_alone(world, engine):
    rng = np.random.default_rng(0)
    mixes = [LoraRequest.make(["a"]), LoraRequest.make(["b"]), LoraRequest.make(["c"]), LoraRequest.make(["d"]),
             LoraRequest.make(["a", "c"], {"a": 0.6, "c": 0.4}), LoraRequest.make(["b", "d"], [1.5, -0.5]),
             None, LoraRequest.make(["a"])]
    prompts = [rng.integers(3, 400, int(rng.integers(4, 40))).tolist() for _ in mixes]
    stats = {}
    together = _serve(engine, list(zip(prompts, mixes)), stats)
    assert stats["max_running"] == 8  # all eight decoded in the same steps
    alone = [_serve(engine, [(p, m)])[0] for p, m in zip(prompts, mixes)]
    assert together == alone
    # and they differ from the base model, so the adapters were applied in the batch
    base = _serve(engine, [(p, None) for p in prompts])
    assert sum(t != b for t, b in zip(together, base)) >= 5
    # the single-adapter greedy tokens equal PEFT's
    from tests.tiny_models import hf_greedy

    assert together[0] == hf_greedy(world["peft"]["a"], prompts[0], GREEDY.max_tokens)
    assert engine.lora.num_resident == 4 and not any(engine.lora.pinned(n) for n in "abcd")


def test_prefix_cache_never_crosses_adapters(world, engine):
    """The base model's pages for a prompt are cached, then the prompt runs under an adapter: its
    output must equal the adapter's on an engine that never saw the prompt (no reused K/V)."""
    prompt = list(range(10, 60))  # six full pages
    fresh = _serve(_small_engine(world, ["a"]), [(prompt, LoraRequest.make(["a"]))])[0]
    base = _serve(engine, [(prompt, None)])[0]
    assert _serve(engine, [(prompt, LoraRequest.make(["a"]))])[0] == fresh != base
    assert _serve(engine, [(prompt, LoraRequest.make(["a"], [0.5]))])[0] != fresh  # another mix, other K/V
    assert _serve(engine, [(prompt, None)])[0] == base


def test_more_adapters_than_slots_evict_and_wait(world):
    eng = _small_engine(world, "abcd")
    jobs = [(list(range(3, 20 + i)), LoraRequest.make([n])) for i, n in enumerate("abcdab")]
    together = _serve(eng, jobs)
    assert together == [_serve(eng, [j])[0] for j in jobs]
    assert eng.lora.evictions >= 4


def test_unload_in_use_waits_for_the_request(world):
    eng = _small_engine(world, "a")
    ref = _serve(eng, [(list(range(3, 30)), LoraRequest.make(["a"]))])[0]
    rid = eng.add_request(list(range(3, 30)), GREEDY, lora=LoraRequest.make(["a"]))
    tokens = []
    for o in eng.step():  # admitted and prefilled: it now holds the adapter
        tokens += o.new_token_ids
    assert eng.remove_adapter("a") is False  # in use: goes when the request ends
    with pytest.raises(AdapterNotFoundError, match="'a' is not loaded"):
        eng.add_request([5, 6, 7], GREEDY, lora=LoraRequest.make(["a"]))
    while eng.has_unfinished():
        for o in eng.step():
            tokens += o.new_token_ids
    assert tokens == ref  # the running request kept its adapter to the end
    assert "a" not in eng.lora.names() and eng.lora.num_resident == 0
    eng.add_adapter(world["adapters"]["a"])  # the name can be loaded again


@pytest.mark.parametrize("req, err, match", [
    (LoraRequest.make(["zzz"]), AdapterNotFoundError, "'zzz' is not loaded"),
    (LoraRequest.make(["a"], [float("nan")]), AdapterError, "not finite"),
    (LoraRequest.make(["a"], strategy="svd"), AdapterError, "not one of"),
    (LoraRequest.make(["a", "a"]), AdapterError, "twice"),
    (LoraRequest.make([]), AdapterError, "empty"),
    (LoraRequest.make(["a", "b", "c", "d", "e"]), AdapterError, "exceeds --max-loras 4"),
])
def test_bad_mixes_are_refused_and_leave_nothing(engine, req, err, match):
    with pytest.raises(err, match=match):
        engine.add_request([5, 6, 7], GREEDY, lora=req)
    assert not engine.has_unfinished()


def test_queued_requests_hold_their_adapters(world):
    """Requests still waiting in the queue keep their adapter (and a merged mix its parents)
    through an unload; a merge cache smaller than the queue never drops a mix a request holds."""
    eng = _small_engine(world, "ab", max_loras=1)
    eng.lora.max_merged = 1
    ref = _serve(_small_engine(world, "ab"), [([4, 5, 6, 7], LoraRequest.make(["a"]))])[0]
    jobs = [([4, 5, 6, 7], LoraRequest.make(["a"]))] + [
        ([4, 5, 6, 7], LoraRequest.make(["a", "b"], strategy="dare_linear", density=0.5, seed=s)) for s in range(3)]
    ids = [eng.add_request(p, GREEDY, lora=lr) for p, lr in jobs]  # one slot: three of them must wait
    assert eng.remove_adapter("a") is False and eng.remove_adapter("b") is False
    out = {rid: [] for rid in ids}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id] += o.new_token_ids
    assert out[ids[0]] == ref and all(len(out[r]) == GREEDY.max_tokens for r in ids)
    assert eng.lora.all_names() == set() and eng.lora.num_resident == 0  # both unloaded once all ended


def test_mix_beyond_max_loras_is_refused(world):
    eng = _small_engine(world, "abc")
    with pytest.raises(AdapterError, match="--max-loras 2"):
        eng.add_request([5, 6], GREEDY, lora=LoraRequest.make(["a", "b", "c"]))


def test_adapters_that_do_not_fit_are_refused(world, tmp_path):
    lm = world["lm"]
    with pytest.raises(AdapterError, match="rank 16 exceeds --max-lora-rank 8"):
        read_adapter(world["dir"] / "d", "d", lm.cfg, max_rank=8)
    other = make_hf_model(tmp_path / "other", "qwen3", vocab_size=400, hidden_size=32, head_dim=8,
                          intermediate_size=48)
    make_peft_adapter(other, tmp_path / "small", seed=0)
    with pytest.raises(AdapterError, match="not this base model"):
        read_adapter(tmp_path / "small", "small", lm.cfg)
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "nowhere", "x", lm.cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="without adapter_config.json"):
        read_adapter(tmp_path / "empty", "x", lm.cfg)


def test_llm_generate_with_per_prompt_adapters(world, tmp_path):
    """hyprjax.LLM: load_lora, then one generate call with a different adapter spec per prompt."""
    import shutil

    from bench.make_model import build_tokenizer
    from hyprjax import LLM, LoraRequest as Req

    model_dir = tmp_path / "m"
    shutil.copytree(world["dir"] / "base", model_dir)
    build_tokenizer(400).save(str(model_dir / "tokenizer.json"))
    llm = LLM(str(model_dir), dtype="float32", progress=False, max_loras=2)
    llm.load_lora("a", world["dir"] / "a")
    llm.load_lora("b", world["dir"] / "b")
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    specs = ["a", {"a": 0.5, "b": 0.5}, None]
    out = llm.generate(prompts, GREEDY, lora=specs)
    eng = llm.engine()
    want = [_serve(eng, [(p, None if s is None else Req.make([s]) if isinstance(s, str) else Req.make(list(s), s))])[0]
            for p, s in zip(prompts, specs)]
    assert [c.token_ids for c in out] == want
    assert out[0].token_ids != llm.generate([prompts[0]], GREEDY)[0].token_ids  # the adapter mattered
    with pytest.raises(AdapterNotFoundError):
        llm.generate(prompts[:1], GREEDY, lora="nope")
    with pytest.raises(Exception, match="one per prompt"):
        llm.generate(prompts, GREEDY, lora=["a"])


def test_runtime_load_paths_stay_inside_the_allowed_places(tmp_path):
    from hyprjax.adapters.load import AdapterPathError, check_allowed

    root, outside = tmp_path / "adapters", tmp_path / "outside"
    (root / "good").mkdir(parents=True)
    (root / "sneaky").mkdir()
    outside.mkdir()
    for d in (root / "good", root / "sneaky", outside):
        (d / "adapter_config.json").write_text("{}")
    (root / "good" / "adapter_model.safetensors").write_bytes(b"")
    (outside / "adapter_model.safetensors").write_bytes(b"")
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (root / "link").symlink_to(outside)
    assert check_allowed(root / "good", [], root) == (root / "good").resolve()
    assert check_allowed(outside, [outside], None) == outside.resolve()  # given with --lora
    for bad in (outside, root / "sneaky", root / "link", f"{root}/../outside", root, "a\0b"):
        with pytest.raises(AdapterPathError):
            check_allowed(bad, [], root)
    with pytest.raises(AdapterPathError, match="given with --lora"):
        check_allowed(root / "good", [], None)


def test_no_compiles_after_warmup_with_adapters_mixes_merges_and_evictions(world):
    lm = world["lm"]
    eng = LLMEngine(lm.model, lm.cfg, None, EngineConfig(max_loras=2, max_lora_rank=16, **ENGINE), progress=False)
    for n in "abcd":
        eng.add_adapter(world["adapters"][n])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: compiles.append(name) if name.endswith("backend_compile_duration") else None)
    rng = np.random.default_rng(3)
    mixes = [None, LoraRequest.make(["a"]), LoraRequest.make(["b", "c"], [0.3, 0.7]), LoraRequest.make(["d"]),
             LoraRequest.make(["a", "b"], strategy="ties", density=0.5), None, LoraRequest.make(["c"])]
    jobs = [(rng.integers(3, 400, int(rng.integers(1, 100))).tolist(), m) for m in mixes * 2]
    _serve(eng, jobs)
    _serve(eng, jobs[:1])
    assert compiles == [] and eng.lora.evictions > 0
