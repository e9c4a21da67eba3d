"""Paged attention: the XLA path and both Pallas kernels (interpret mode) vs a dense naive form."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyprjax.kernels.lora import bf16_bits
from hyprjax.kernels.paged_attention import (_pallas_gpu, _pallas_tpu, naive_paged_attention,
                                             paged_attention)

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
H = 16  # smallest head dim the Triton lowering accepts (dot dims >= 16)


def make_case(rng, *, seqs, block_q, page_size, kv_heads, group, dtype, pad_blocks=1,
              head_dim=H):
    """A step of `seqs` = [(context_len, new_tokens)], each segment padded to block_q.

    Pages come from a shuffled pool with spare pages, page-table entries past a sequence's
    length hold garbage (-1 or ids past the pool), and blocks refer to page-table rows out of
    order, so nothing works by accident of layout.
    """
    max_pages = max(-(-c // page_size) for c, _ in seqs) + 1
    num_pages = sum(-(-c // page_size) for c, _ in seqs) + 3
    pool = iter(rng.permutation(num_pages))
    rows = rng.permutation(len(seqs) + 1)  # one page-table row no block uses
    table = rng.choice([-1, num_pages + 7], size=(len(seqs) + 1, max_pages))
    lens = np.zeros(len(seqs) + 1, np.int32)
    block_seq, positions = [], []
    for (ctx, new), row in zip(seqs, rows):
        table[row, :-(-ctx // page_size)] = [next(pool) for _ in range(-(-ctx // page_size))]
        lens[row] = ctx
        pos = list(range(ctx - new, ctx))
        pos += [-1] * (-len(pos) % block_q)
        block_seq += [row] * (len(pos) // block_q)
        positions += pos
    block_seq += [-1] * pad_blocks
    positions += [-1] * (pad_blocks * block_q)
    t, n = len(positions), kv_heads * group
    rand = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    pool = (num_pages, page_size, kv_heads, head_dim)
    return (rand(t, n, head_dim), rand(*pool), rand(*pool), jnp.asarray(block_seq, jnp.int32),
            jnp.asarray(positions, jnp.int32), jnp.asarray(table, jnp.int32), jnp.asarray(lens))


def decode(ps):  # context lengths 1, page boundaries +-1, long
    return [(1, 1), (ps - 1, 1), (ps, 1), (ps + 1, 1), (2 * ps + 1, 1), (6 * ps + 3, 1)]


def prefill(ps, bq):  # fresh prompts, chunks after cached context, a decode row in the batch
    return [(5, 5), (ps + 1, ps + 1), (3 * ps + 2, 7), (2 * ps, bq + 3), (4 * ps - 1, 1)]


# (block_q, page_size, kv heads, GQA group, dtype, sliding_window, softcap)
CASES = {
    "decode-f32-ps8-mha": (1, 8, 2, 1, jnp.float32, None, None),
    "decode-bf16-ps16-gqa4-window": (1, 16, 2, 4, jnp.bfloat16, 20, None),
    "decode-f32-ps16-gqa4-softcap": (1, 16, 1, 4, jnp.float32, None, 5.0),
    "prefill8-f32-ps8-gqa4": (8, 8, 2, 4, jnp.float32, None, None),
    "prefill16-bf16-ps8-mha-softcap": (16, 8, 2, 1, jnp.bfloat16, None, 5.0),
    "prefill16-f32-ps16-mha-window": (16, 16, 2, 1, jnp.float32, 11, None),
    "prefill8-bf16-ps16-gqa4-window-softcap": (8, 16, 1, 4, jnp.bfloat16, 9, 5.0),
    "prefill8-f32-ps8-gqa4-window1": (8, 8, 1, 4, jnp.float32, 1, None),
}

_tpu = jax.jit(_pallas_tpu, static_argnames=("scale", "block_q", "softcap", "block_kv", "interpret"))
IMPLS = {  # (args, kwargs, page_size) -> out
    "xla": lambda a, kw, ps: paged_attention(*a, **kw),
    "xla-page-blocks": lambda a, kw, ps: paged_attention(*a, **kw, block_kv=ps),
    "pallas-gpu": lambda a, kw, ps: paged_attention(*a, **kw, backend="pallas", interpret=True),
    "pallas-tpu": lambda a, kw, ps: _tpu(*a, **kw, block_kv=32, interpret=True),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_naive(case, impl):
    block_q, ps, kv_heads, group, dtype, window, softcap = CASES[case]
    seqs = decode(ps) if block_q == 1 else prefill(ps, block_q)
    args = make_case(np.random.default_rng(len(case)), seqs=seqs, block_q=block_q,
                     page_size=ps, kv_heads=kv_heads, group=group, dtype=dtype)
    kw = dict(scale=H ** -0.5, block_q=block_q, sliding_window=window, softcap=softcap)
    got = IMPLS[impl](args, kw, ps)
    want = naive_paged_attention(*args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **TOL[dtype])
    pad = np.asarray(args[4]) < 0
    assert pad.any() and not np.asarray(got, np.float32)[pad].any()  # padding rows exactly 0
    assert np.abs(np.asarray(want, np.float32)[~pad]).min() > 0  # inputs were never zero


@pytest.mark.parametrize("impl, pool", [(impl, pool) for impl in IMPLS for pool in ("bfloat16", "bits")
                                        if pool == "bfloat16" or impl.startswith("xla")])  # bits: XLA only
@pytest.mark.parametrize("block_q", [1, 8])
def test_a_narrower_pool_reads_as_its_widened_values(block_q, pool, impl):
    """A bfloat16 KV cache under float32 queries (engine `kv_cache_dtype`): each implementation
    equals float32 attention over the pool's values widened, to float32 tolerance. "bits" is the
    XLA path's uint16 storage of the same values (engine/paged.py `kv_storage_dtype`)."""
    ps = 8
    seqs = decode(ps) if block_q == 1 else prefill(ps, block_q)
    args = list(make_case(np.random.default_rng(11), seqs=seqs, block_q=block_q, page_size=ps, kv_heads=2,
                          group=2, dtype=jnp.float32))
    narrow = [args[i].astype(jnp.bfloat16) for i in (1, 2)]
    kw = dict(scale=H ** -0.5, block_q=block_q, sliding_window=None, softcap=None)
    want = naive_paged_attention(args[0], *[a.astype(jnp.float32) for a in narrow], *args[3:], **kw)
    stored = [bf16_bits(a) for a in narrow] if pool == "bits" else narrow
    got = IMPLS[impl]([args[0], *stored, *args[3:]], kw, ps)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **TOL[jnp.float32])
    # and the rounding is really there: float32 pools give a different answer
    assert np.abs(np.asarray(want) - np.asarray(naive_paged_attention(*args, **kw))).max() > 1e-4


STACKED_IMPLS = {  # a stacked [L, P, ...] pool, the layer and the window passed as traced arrays
    "xla": lambda a, kw, layer, win: paged_attention(*a, **kw, layer=layer, sliding_window=win),
    "pallas-gpu": lambda a, kw, layer, win: paged_attention(*a, **kw, layer=layer, sliding_window=win,
                                                            backend="pallas", interpret=True),
    "pallas-tpu": lambda a, kw, layer, win: _tpu(*a, **kw, layer=layer, sliding_window=win, block_kv=16,
                                                 interpret=True),
}


@pytest.mark.parametrize("impl", STACKED_IMPLS)
@pytest.mark.parametrize("block_q", [1, 8])
def test_stacked_pool_reads_the_named_layer_with_a_traced_window(impl, block_q):
    """The scanned decoder's pool: every layer in one array, the layer and window as data."""
    ps, layers = 8, 3
    seqs = decode(ps) if block_q == 1 else prefill(ps, block_q)
    rng = np.random.default_rng(5)
    args = list(make_case(rng, seqs=seqs, block_q=block_q, page_size=ps, kv_heads=2, group=2,
                          dtype=jnp.float32))
    pools = [jnp.asarray(rng.standard_normal((layers, *args[1].shape)), jnp.float32) for _ in range(2)]
    kw = dict(scale=H ** -0.5, block_q=block_q, softcap=None)
    run = jax.jit(lambda layer, win: STACKED_IMPLS[impl]([args[0], *pools, *args[3:]], kw, layer, win))
    for layer, window in ((2, 5), (1, 1 << 30), (0, 9)):
        got = run(jnp.int32(layer), jnp.int32(window))
        want = naive_paged_attention(args[0], *pools, *args[3:], **kw, sliding_window=window,
                                     layer=layer)
        np.testing.assert_allclose(got, want, **TOL[jnp.float32])


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_unreferenced_pages_never_read(backend):
    """Spare pool pages and table entries past a context may hold anything (here NaN)."""
    args = list(make_case(np.random.default_rng(1), seqs=prefill(8, 8), block_q=8, page_size=8,
                          kv_heads=2, group=2, dtype=jnp.float32))
    used = {int(p) for row, n in zip(np.asarray(args[5]), np.asarray(args[6]))
            for p in row[:-(-n // 8)]}
    spare = np.array([p not in used for p in range(args[1].shape[0])])
    for i in (1, 2):
        args[i] = jnp.where(spare[:, None, None, None], jnp.nan, args[i])
    kw = dict(scale=0.25, block_q=8)
    got = paged_attention(*args, **kw, backend=backend, interpret=backend == "pallas")
    want = naive_paged_attention(*[jnp.nan_to_num(a) for a in args], **kw)
    np.testing.assert_allclose(got, want, **TOL[jnp.float32])


def _ok_args():
    return make_case(np.random.default_rng(2), seqs=[(9, 2)], block_q=2, page_size=8,
                     kv_heads=2, group=2, dtype=jnp.float32)


@pytest.mark.parametrize("change, kwargs, match", [
    (lambda a: a.__setitem__(0, a[0][..., :8]), {}, "k_pages.shape"),
    (lambda a: a.__setitem__(2, a[2][:, :4]), {}, "v_pages.shape"),
    (lambda a: a.__setitem__(2, a[2].astype(jnp.bfloat16)), {}, "v_pages.dtype"),
    (lambda a: (a.__setitem__(1, a[1].astype(jnp.int32)), a.__setitem__(2, a[2].astype(jnp.int32))), {},
     "k_pages.dtype"),
    (lambda a: a.__setitem__(4, a[4][:-1]), {}, "q_positions.shape"),
    (lambda a: a.__setitem__(3, a[3].astype(jnp.float32)), {}, "q_block_seq.dtype"),
    (lambda a: a.__setitem__(6, a[6][:1]), {}, "context_lens.shape"),
    (lambda a: None, {"block_q": 3}, "block_q=3"),
    (lambda a: None, {"block_kv": 12}, "block_kv=12"),
    (lambda a: None, {"sliding_window": 0}, "sliding_window=0"),
    (lambda a: None, {"softcap": -1.0}, "softcap=-1.0"),
    (lambda a: None, {"backend": "triton"}, "backend='triton'"),
])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_bad_inputs_name_the_argument(change, kwargs, match, backend):
    args = list(_ok_args())
    change(args)
    kw = dict(scale=0.25, block_q=2, backend=backend, interpret=True) | kwargs
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        paged_attention(*args, **kw)


def test_pallas_refuses_a_bits_pool():
    args = list(_ok_args())
    args[1], args[2] = bf16_bits(args[1]), bf16_bits(args[2])
    with pytest.raises(ValueError, match="uint16"):
        paged_attention(*args, scale=0.25, block_q=2, backend="pallas", interpret=True)
    paged_attention(*args, scale=0.25, block_q=2)  # the XLA path reads it


def _abstract_args(dtype, block_q, t=16, n=8, kv_heads=2, head_dim=128, pool_dtype=None):
    s = jax.ShapeDtypeStruct
    pool = s((30, 16, kv_heads, head_dim), pool_dtype or dtype)  # pool and rows need not be powers of two
    return (s((t, n, head_dim), dtype), pool, pool, s((t // block_q,), jnp.int32),
            s((t,), jnp.int32), s((4, 6), jnp.int32), s((4,), jnp.int32))


@pytest.mark.parametrize("dtype, pool_dtype", [(jnp.float32, None), (jnp.bfloat16, None),
                                               (jnp.float32, jnp.bfloat16)])
@pytest.mark.parametrize("block_q, window, softcap", [(1, None, None), (8, 32, 30.0)])
def test_kernels_lower_for_gpu_and_tpu(dtype, pool_dtype, block_q, window, softcap):
    """Lowering without a device runs the Triton and Mosaic TPU Pallas lowerings (not ptxas or
    libtpu), which catches unsupported ops, non-power-of-two Triton tiles and ref indexing."""
    kw = dict(scale=0.125, block_q=block_q, sliding_window=window, softcap=softcap,
              block_kv=32, interpret=False)
    for impl, platform in ((_pallas_gpu, "cuda"), (_pallas_tpu, "tpu")):
        lowered = jax.jit(functools.partial(impl, **kw)).trace(
            *_abstract_args(dtype, block_q, pool_dtype=pool_dtype)).lower(lowering_platforms=(platform,))
        assert "paged_attention" in lowered.as_text()


@pytest.mark.parametrize("block_q", [1, 8])
def test_kernels_lower_with_a_stacked_pool_and_traced_window(block_q):
    kw = dict(scale=0.125, block_q=block_q, softcap=None, block_kv=32, interpret=False)
    q, pool, _, *rest = _abstract_args(jnp.bfloat16, block_q)
    stacked = jax.ShapeDtypeStruct((3, *pool.shape), pool.dtype)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    for impl, platform in ((_pallas_gpu, "cuda"), (_pallas_tpu, "tpu")):
        f = lambda q, k, v, a, b, c, d, layer, win, impl=impl: impl(q, k, v, a, b, c, d, layer=layer,  # noqa: E731
                                                                      sliding_window=win, **kw)
        lowered = jax.jit(f).trace(q, stacked, stacked, *rest, scalar, scalar).lower(lowering_platforms=(platform,))
        assert "paged_attention" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_on_device(dtype):
    """The same kernel, compiled for the accelerator, against the XLA path there."""
    if jax.default_backend() == "cpu":
        pytest.skip("needs a GPU or TPU")
    args = make_case(np.random.default_rng(3), seqs=prefill(16, 16), block_q=16, page_size=16,
                     kv_heads=2, group=4, dtype=dtype, head_dim=128)
    kw = dict(scale=0.1, block_q=16, sliding_window=40, softcap=30.0)
    got = paged_attention(*args, **kw, backend="pallas")
    want = paged_attention(*args, **kw, backend="xla")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               **TOL[dtype])
