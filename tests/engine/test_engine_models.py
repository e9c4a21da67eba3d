"""The paged engine where test_engine.py does not reach, against transformers (torch, CPU):
Gemma 3 sliding windows through chunked prefill, bfloat16 weights, and the Pallas attention
kernel (interpret mode) under the whole engine.

Times are CPU seconds on the 2-core machine (each test compiles the step buckets its run meets,
which is most of it); `slow` is the marker pyproject.toml declares for tests past a few seconds.
CI runs them all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_models import hf_greedy, hf_logprobs, make_hf_model
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.formats.load import load_model
from hyprjax.sampling import SamplingParams

pytestmark = pytest.mark.slow
N_TOKENS = 16
GREEDY = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
WINDOW = 12  # Gemma 3's sliding window here: shorter than every prompt below, three 4-token pages
F32_ATOL = 1e-4  # float32 logprobs against transformers; measured at most 9.5e-7 in every test here
BF16_ATOL = 0.02  # see test_bfloat16_engine_is_within_bf16_error_of_float32_transformers


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A 4-layer Gemma 3: three sliding layers (window 12) around one global layer, two RoPE bases."""
    d = tmp_path_factory.mktemp("gemma3_engine")
    # eager attention, the implementation transformers recommends for Gemma 3. Its sliding mask
    # lets position p see p - window < s <= p (masking_utils.sliding_window_overlay:
    # kv_idx > q_idx - sliding_window), the convention of kernels/paged_attention.py's
    # `q_pos - kv_pos < sliding_window`; a window of 11 or 13 moves these logits by 0.4-0.6.
    hf = make_hf_model(d, "gemma3", num_hidden_layers=4, sliding_window=WINDOW, attn_implementation="eager",
                       layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    return hf, d


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_engine")
    hf = make_hf_model(d, "qwen3", head_dim=32)  # the Pallas (Triton) kernel wants a power-of-two head dim
    return hf, d


def _engine(d, dtype="float32", *, interpret=False, **settings):
    lm = load_model(d, dtype=dtype, with_tokenizer=False, progress=False)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(lm.model))} == {jnp.dtype(dtype)}
    return LLMEngine(lm.model, lm.cfg, None, EngineConfig(**settings), warmup=False, progress=False,
                     interpret=interpret)


def _prompts(lengths, seed, vocab=320):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _serve(engine, prompts, params, logprobs=None):
    """Add every request at once, step until all finish; [(tokens, logprobs)] in prompt order."""
    ids = [engine.add_request(p, params, logprobs=logprobs) for p in prompts]
    out = {rid: ([], []) for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(o.logprobs or [])
    return [out[rid] for rid in ids]


def _assert_logprobs(lps, tokens, ref, atol) -> float:
    """The engine's logprobs (sampled and top-k) within atol of ref [len(tokens), V], the reference
    log-softmax at each sampled position; its top-k set is ref's top-k up to near-ties. Returns
    the largest error seen."""
    assert [lp.token_id for lp in lps] == tokens
    worst = 0.0
    for lp, row in zip(lps, ref):
        ids = [lp.token_id] + [t for t, _ in lp.top]
        got = np.asarray([lp.logprob] + [v for _, v in lp.top])
        np.testing.assert_allclose(got, row[ids], atol=atol, rtol=0)
        k = len(lp.top)  # compared as sorted values: two near-equal logprobs may swap places
        np.testing.assert_allclose(np.sort(row[ids[1:]]), np.sort(row)[-k:], atol=2 * atol, rtol=0)
        worst = max(worst, float(np.abs(got - row[ids]).max()))
    return worst


def test_gemma3_sliding_window_through_chunked_prefill_equals_transformers(gemma3):
    """Three prompts of 41-70 tokens, run together: a 16-token step budget shared by two
    prefills cuts each into 3 or more chunks, so chunk edges fall inside the 12-token window,
    which spans three 4-token pages. Greedy tokens equal transformers' `generate`, and the
    sampled and top-20 logprobs at every step (the first sampled position included) equal its
    log-softmax within F32_ATOL. 22 s."""
    hf, d = gemma3
    engine = _engine(d, max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=2, page_size=4, block_q=4,
                     num_pages=96, max_model_len=128)
    prompts = _prompts([41, 55, 70], seed=0)
    for p, (tokens, lps) in zip(prompts, _serve(engine, prompts, GREEDY, logprobs=20)):
        assert tokens == hf_greedy(hf, p, N_TOKENS)
        _assert_logprobs(lps, tokens, hf_logprobs(hf, p + tokens)[len(p) - 1:], F32_ATOL)
    assert engine.block_manager.num_used_pages == 0


def test_bfloat16_engine_is_within_bf16_error_of_float32_transformers(qwen3):
    """bf16 weights, activations and KV pages against transformers in float32 on the float32 weights.

    Tolerance: bf16 keeps 8 significant bits (rounding error 2^-9 ~ 0.2% of a value); weights and
    every activation are rounded, and this model's logits are at most ~1.1 in size, so its
    logprobs err by a few 0.1% of 1: measured at most 0.0037 over the 48 positions below. BF16_ATOL = 0.02 leaves 5x
    headroom and still catches a lost context token: dropping one of these prompts' tokens moves
    the next logprobs by 0.06-0.22 (measured).
    Only what that bound implies is asserted about tokens: where transformers' top-1 margin
    exceeds 2 * BF16_ATOL, bf16 greedy must pick transformers' (and so the float32 engine's)
    token, so the two greedy runs agree up to the first position whose margin is closer than
    that; measured margins here are >= 0.21 at every position, so that is all 16 tokens.
    26 s (two engines)."""
    hf, d = qwen3
    settings = dict(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_seqs=2, page_size=8, block_q=8,
                    num_pages=64, max_model_len=128)
    prompts = _prompts([5, 23, 47], seed=1)
    f32 = _serve(_engine(d, "float32", **settings), prompts, GREEDY, logprobs=20)
    bf16 = _serve(_engine(d, "bfloat16", **settings), prompts, GREEDY, logprobs=20)
    for p, (t32, _), (t16, lp16) in zip(prompts, f32, bf16):
        assert t32 == hf_greedy(hf, p, N_TOKENS)
        _assert_logprobs(lp16, t16, hf_logprobs(hf, p + t16)[len(p) - 1:], BF16_ATOL)
        top2 = np.sort(hf_logprobs(hf, p + t32)[len(p) - 1:], axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * BF16_ATOL
        n = len(clear) if clear.all() else int(clear.argmin())
        assert n >= 4, f"transformers' margins are too close to test bf16 greedy tokens: {top2[:, 1] - top2[:, 0]}"
        assert t16[:n] == t32[:n]


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_pallas_backend_in_interpret_mode_equals_xla_and_transformers(arch, request):
    """The whole engine with the Pallas paged-attention kernel run by `interpret=True` on CPU: two
    prompts (5 and 19 tokens; 19 crosses Gemma 3's 12-token window) prefilled in 8-token chunks,
    8 greedy tokens. 22 s (Qwen3), 24 s (Gemma 3), both engines."""
    hf, d = request.getfixturevalue(arch)
    settings = dict(max_num_seqs=2, max_num_batched_tokens=8, max_prefill_seqs=2, page_size=4, block_q=4,
                    num_pages=32, max_model_len=64)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = _prompts([5, 19], seed=2)
    xla = _serve(_engine(d, attention_backend="xla", **settings), prompts, params, logprobs=5)
    pallas = _serve(_engine(d, attention_backend="pallas", interpret=True, **settings), prompts, params, logprobs=5)
    for p, (tx, lx), (tp, lp) in zip(prompts, xla, pallas):
        assert tp == tx == hf_greedy(hf, p, 8)
        ref = hf_logprobs(hf, p + tp)[len(p) - 1:]
        _assert_logprobs(lp, tp, ref, F32_ATOL)
        _assert_logprobs(lx, tx, ref, F32_ATOL)
        # The kernel's online softmax sums in another order than the reference: float32 rounding only.
        np.testing.assert_allclose([x.logprob for x in lp], [x.logprob for x in lx], atol=1e-5, rtol=0)


def test_fused_and_layerwise_steps_agree_with_an_adapter_mix(gemma3, tmp_path):
    """The two ways engine/step.py runs a step, on the same Gemma 3 (sliding window, chunked
    prefill) and a LoRA mix: stacked layers (`scan_layers=True`: one fused program per bucket,
    the GPU/TPU path) and one array per layer (a program per layer, the CPU path). Greedy tokens
    identical; logprobs within 1e-5 (float32: the same math, compiled in other fusions). 30 s."""
    from hyprjax.adapters.load import read_adapter
    from hyprjax.adapters.registry import LoraRequest
    from tests.adapters.peft_models import make_peft_adapter

    hf, d = gemma3
    make_peft_adapter(hf, tmp_path / "a", seed=5, r=4, alpha=8, magnitude=0.1)
    settings = dict(max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=2, page_size=4, block_q=4,
                    num_pages=96, max_model_len=128, max_loras=2, max_lora_rank=8)
    prompts = _prompts([23, 41], seed=3)
    runs = []
    for scan in (True, False):
        lm = load_model(d, with_tokenizer=False, progress=False, scan_layers=scan)
        engine = LLMEngine(lm.model, lm.cfg, None, EngineConfig(**settings), warmup=False, progress=False)
        engine.add_adapter(read_adapter(tmp_path / "a", "a", lm.cfg))
        ids = [engine.add_request(p, GREEDY, logprobs=5, lora=lora)
               for p, lora in zip(prompts, [None, LoraRequest.make(["a"], [0.7])])]
        out = {rid: ([], []) for rid in ids}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id][0].extend(o.new_token_ids)
                out[o.request_id][1].extend(o.logprobs or [])
        runs.append([out[rid] for rid in ids])
        assert (engine.runner.state.__class__.__name__ == "LayerwiseState") == (not scan)
    (fused, layerwise) = runs
    for (tf, lf), (tl, ll) in zip(fused, layerwise):
        assert tf == tl
        np.testing.assert_allclose([x.logprob for x in lf], [x.logprob for x in ll], atol=1e-5, rtol=0)
    assert fused[0][0] == hf_greedy(hf, prompts[0], N_TOKENS)
    assert fused[1][0] != hf_greedy(hf, prompts[1], N_TOKENS)  # the adapter mattered
