"""Paged GQA attention over a paged KV cache, for decode and ragged/chunked prefill.

Layout: K/V live in a page pool `[P, page_size, K, H]`, or a stacked pool `[L, P, page_size, K, H]`
holding every layer (the scanned decoder's carry) with `layer` naming the one to read; a
sequence's cache is the pages listed in its `page_table` row. The XLA path indexes a stacked
pool `[layer, page]`; the Pallas kernels see it as one `[L * P, ...]` pool with the layer's page
ids offset by `layer * P`, so they never copy a layer out of the pool. A step's query tokens are flattened to `[T, N, H]` and cut into query
blocks of `block_q` rows, each block belonging to one sequence (`q_block_seq`), so a block needs
one page-table row and one context length: the kernel's unit of work. See docs/paged_attention.md.

Implementations sharing `_check_inputs`, `_block_meta` and the online-softmax step:
  * `ref_paged_attention`: jnp, flash-style `while_loop` over kv blocks; the CPU serving path.
  * `_pallas_gpu`: grid (query block, kv head), in-kernel loop over the block's kv range reading
    pages through the page table (Triton lowering on GPU; `interpret=True` on CPU).
  * `_pallas_tpu`: grid (query block, kv block), page table scalar-prefetched into SMEM so the
    BlockSpec pipeline DMAs the named pages (Mosaic TPU; `pltpu.force_tpu_interpret_mode`).
  * `naive_paged_attention`: dense gather + softmax, ground truth for tests only.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .lora import widen

_BACKENDS = ("xla", "pallas")
_SQ = pl.squeezed  # block dim of size 1, dropped from the kernel's ref


def _check_inputs(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, *,
                  scale, block_q, sliding_window, softcap, block_kv, default_tokens, layer=None):
    """Validate shapes, dtypes and block sizes; ValueError naming the argument and its value.

    Returns block_kv; the default is about `default_tokens` tokens (a power of two for
    power-of-two pages, as Triton tiles need), capped near one page-table row.
    """
    def bad(name, value, want):
        raise ValueError(f"paged_attention: {name}={value} {want}")

    if q.ndim != 3:
        bad("q.shape", q.shape, "must be [T, N, H]")
    if k_pages.ndim not in (4, 5):
        bad("k_pages.shape", k_pages.shape, "must be [P, page_size, K, H] or [L, P, page_size, K, H]")
    if (layer is None) != (k_pages.ndim == 4):
        bad("layer", layer, "must be given exactly when the pool is stacked [L, P, page_size, K, H]")
    if layer is not None and (jnp.shape(layer) != () or jnp.result_type(layer) != jnp.int32):
        bad("layer", layer, "must be an int32 scalar")
    if v_pages.shape != k_pages.shape:
        bad("v_pages.shape", v_pages.shape, f"must equal k_pages.shape {k_pages.shape}")
    t, n, h = q.shape
    page_size, kh, hk = k_pages.shape[-3:]
    if hk != h:
        bad("k_pages.shape", k_pages.shape, f"head dim must equal q's H={h}")
    if n % kh:
        bad("k_pages.shape", k_pages.shape, f"kv heads K={kh} must divide q heads N={n}")
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating) and not (name != "q" and x.dtype == jnp.uint16):
            bad(f"{name}.dtype", x.dtype, "must be floating" + ("" if name == "q" else " (or uint16 bfloat16 bits)"))
    if k_pages.dtype != v_pages.dtype:
        bad("v_pages.dtype", v_pages.dtype, f"must equal k_pages.dtype {k_pages.dtype}")
    if not isinstance(block_q, int) or block_q < 1 or t % block_q:
        bad("block_q", block_q, f"must be a positive int dividing T={t}")
    if page_table.ndim != 2:
        bad("page_table.shape", page_table.shape, "must be [S, max_pages]")
    want = {"q_block_seq": (t // block_q,), "q_positions": (t,),
            "context_lens": (page_table.shape[0],)}
    for name, x in (("q_block_seq", q_block_seq), ("q_positions", q_positions),
                    ("page_table", page_table), ("context_lens", context_lens)):
        if x.dtype != jnp.int32:
            bad(f"{name}.dtype", x.dtype, "must be int32")
        if name in want and x.shape != want[name]:
            bad(f"{name}.shape", x.shape, f"must be {want[name]}")
    if block_kv is None:
        block_kv = page_size * min(max(1, default_tokens // page_size),
                                   pl.next_power_of_2(page_table.shape[1]))
    if not isinstance(block_kv, int) or block_kv < page_size or block_kv % page_size:
        bad("block_kv", block_kv, f"must be a positive multiple of page_size={page_size}")
    if not isinstance(scale, numbers.Real):
        bad("scale", scale, "must be a real number (static under jit)")
    if isinstance(sliding_window, jax.Array):
        if sliding_window.shape != () or sliding_window.dtype != jnp.int32:
            bad("sliding_window", sliding_window, "must be None, a positive int or an int32 scalar array")
    elif sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        bad("sliding_window", sliding_window, "must be None, a positive int or an int32 scalar array")
    if softcap is not None and not softcap > 0:
        bad("softcap", softcap, "must be None or > 0")
    return block_kv


def _block_meta(q_block_seq, q_positions, page_table, context_lens, *, block_q, page_size,
                block_kv, sliding_window, page_offset=0):
    """Per query block: its page row, context length and the kv blocks it must visit.

    Returns pages i32[B, max_pages_padded] (entries past the context replaced by page 0, so
    partially used kv blocks never read a garbage page id; every id plus `page_offset`, the
    layer's first page in a stacked pool), ctx i32[B], lo/hi i32[B] (kv block range; lo == hi
    for padding blocks), where B = T // block_q.
    """
    num_pages = page_table.shape[1]
    pages_per_block = block_kv // page_size
    padded = -(-num_pages // pages_per_block) * pages_per_block
    valid = q_block_seq >= 0
    seq = jnp.where(valid, q_block_seq, 0)
    ctx = jnp.where(valid, context_lens[seq], 0)
    used = jnp.arange(num_pages)[None, :] < (ctx[:, None] + page_size - 1) // page_size
    pages = jnp.where(used, page_table[seq], 0) + page_offset
    pages = jnp.pad(pages, ((0, 0), (0, padded - num_pages)))
    pos = q_positions.reshape(-1, block_q)
    real = pos >= 0
    hi_tok = jnp.minimum(ctx, jnp.max(pos, axis=1) + 1)
    lo_tok = jnp.zeros_like(ctx)
    if sliding_window is not None:  # the earliest token any row of the block can still see
        first = jnp.min(jnp.where(real, pos, jnp.iinfo(jnp.int32).max), axis=1)
        lo_tok = jnp.maximum(first - sliding_window + 1, 0)
    hi = jnp.minimum((hi_tok + block_kv - 1) // block_kv, padded // pages_per_block)
    lo = jnp.minimum(lo_tok // block_kv, hi)
    empty = ~valid | ~jnp.any(real, axis=1) | (hi_tok <= 0)
    return pages, ctx, jnp.where(empty, 0, lo), jnp.where(empty, 0, hi)


def _flat_pool(k_pages, v_pages, layer):
    """A stacked pool [L, P, ...] as one [L * P, ...] pool and the layer's page offset."""
    if layer is None:
        return k_pages, v_pages, 0
    num_layers, num_pages = k_pages.shape[:2]
    flat = (num_layers * num_pages, *k_pages.shape[2:])
    return k_pages.reshape(flat), v_pages.reshape(flat), layer * num_pages


def _window_arg(sliding_window):
    """(windowed, i32[1]) for the kernels: the window travels as data, so one compiled kernel
    serves layers of different windows (a scanned Gemma 3 passes its per-layer window traced)."""
    if sliding_window is None:
        return False, jnp.zeros((1,), jnp.int32)
    return True, jnp.reshape(jnp.asarray(sliding_window, jnp.int32), (1,))


def _visible(kv_pos, q_pos, ctx, sliding_window):
    """Causal/length/window mask; kv_pos [..., 1, S] against q_pos [..., R, 1] (-1 sees nothing)."""
    m = (kv_pos <= q_pos) & (kv_pos < ctx)
    if sliding_window is not None:
        m &= q_pos - kv_pos < sliding_window
    return m


def _softmax_step(s, mask, m, l):
    """One online-softmax update in float32; rows masked so far keep m=-inf and add nothing.

    s, mask [..., S]; m, l [..., 1] (kept 2-D so TPU never relayouts a row vector). Returns
    (p, alpha, m_new, l_new); the caller rescales its accumulator by alpha and adds p @ v.
    """
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # exp(-inf - 0) = 0, never inf - inf
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)
    return p, alpha, m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True)


def _logits(s, scale, softcap):
    s = s * scale
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def ref_paged_attention(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens,
                        *, scale, block_q, sliding_window=None, softcap=None, block_kv=None, layer=None,
                        return_pool=False):
    """jnp paged attention (the XLA path): every query block walks its own kv-block range.

    Iteration i gathers, for every query block b at once, kv block lo[b] + i of its sequence
    ([B, block_kv, K, H]) and folds it into a flash-style online softmax; the trip count is the
    longest range in the step, so cost follows tokens actually attended, not max_pages.

    The pool is threaded through the loop's state rather than read as a loop constant: XLA
    copies a loop constant whose buffer outlives the loop, and inside the scanned decoder that
    was the whole stacked pool, every layer, every step (measured: 780 MB of temporaries for one
    decode step of Gemma 3 270M). `return_pool=True` returns (out, k_pages, v_pages): the caller
    must use these pools from then on, so the buffer is never shared.
    """
    block_kv = _check_inputs(q, k_pages, v_pages, q_block_seq, q_positions, page_table,
                             context_lens, scale=scale, block_q=block_q,
                             sliding_window=sliding_window, softcap=softcap, block_kv=block_kv,
                             default_tokens=128, layer=layer)  # measured best on XLA:CPU (64-128 ~ same)
    t, n, h = q.shape
    page_size, kh, _ = k_pages.shape[-3:]
    g, nb, ppb = n // kh, t // block_q, block_kv // page_size
    pages, ctx, lo, hi = _block_meta(q_block_seq, q_positions, page_table, context_lens,
                                     block_q=block_q, page_size=page_size, block_kv=block_kv,
                                     sliding_window=sliding_window)
    # A stacked pool is indexed [layer, page] directly, never reshaped to [L * P, ...]: on
    # XLA:CPU the reshape made the pool a new value and every layer copied it.
    # Each gathered block is widened to q's dtype: a pool may hold a narrower float, or uint16
    # bfloat16 bits (hyprjax/engine/paged.py `kv_storage_dtype` says why bits on XLA:CPU).
    read = (lambda pool, ids: widen(pool[ids]).astype(q.dtype)) if layer is None else (
        lambda pool, ids: widen(pool[layer, ids]).astype(q.dtype))
    qg = q.reshape(nb, block_q, kh, g, h)
    qpos = q_positions.reshape(nb, 1, 1, block_q, 1)
    span = jnp.arange(block_kv)
    last = pages.shape[1] // ppb - 1

    def block_ids(i):  # [B, pages per kv block]: the pool pages of kv block lo + i of each query block
        j = jnp.minimum(lo + i, last)  # clamped when a query block is done
        return jnp.take_along_axis(pages, j[:, None] * ppb + jnp.arange(ppb), axis=1)

    # The next block's page ids are computed at the end of each trip and carried: a loop-carried
    # value is a buffer, so XLA cannot fuse this index math into the gathers, where it would be
    # recomputed for every gathered element (XLA:CPU did so in the engine's layer-wise step; the
    # time that step lost was elsewhere, docs/engine.md, but the recomputation is pure waste).
    def body(carry):
        i, ids, m, l, acc, k_pages, v_pages = carry
        j = jnp.minimum(lo + i, last)
        k = read(k_pages, ids).reshape(nb, block_kv, kh, h)
        v = read(v_pages, ids).reshape(nb, block_kv, kh, h)
        s = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=jnp.float32)
        kv_pos = (j[:, None] * block_kv + span).reshape(nb, 1, 1, 1, block_kv)
        mask = _visible(kv_pos, qpos, ctx.reshape(nb, 1, 1, 1, 1), sliding_window)
        mask &= (lo + i < hi).reshape(nb, 1, 1, 1, 1)
        p, alpha, m, l = _softmax_step(_logits(s, scale, softcap), mask, m, l)
        pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v,
                        preferred_element_type=jnp.float32)
        return i + 1, block_ids(i + 1), m, l, alpha * acc + pv, k_pages, v_pages

    trips = jnp.max(hi - lo)
    init = (jnp.int32(0), block_ids(0), jnp.full((nb, kh, g, block_q, 1), -jnp.inf, jnp.float32),
            jnp.zeros((nb, kh, g, block_q, 1), jnp.float32),
            jnp.zeros((nb, kh, g, block_q, h), jnp.float32), k_pages, v_pages)
    _, _, _, l, acc, k_pages, v_pages = lax.while_loop(lambda c: c[0] < trips, body, init)
    out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
    out = out.transpose(0, 3, 1, 2, 4).reshape(t, n, h).astype(q.dtype)
    return (out, k_pages, v_pages) if return_pool else out


def naive_paged_attention(q, k_pages, v_pages, q_block_seq, q_positions, page_table,
                          context_lens, *, scale, block_q, sliding_window=None, softcap=None, layer=None):
    """Dense ground truth for tests: gather every token's whole context, mask, softmax."""
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    t, n, h = q.shape
    _, page_size, kh, _ = k_pages.shape
    seq = jnp.repeat(q_block_seq, block_q)  # [T]
    rows = jnp.clip(page_table[jnp.maximum(seq, 0)], 0, k_pages.shape[0] - 1)  # [T, max_pages]
    k = widen(k_pages[rows]).reshape(t, -1, kh, h)  # [T, S, K, H] float32
    v = widen(v_pages[rows]).reshape(t, -1, kh, h)
    k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)  # [T, S, N, H]
    s = _logits(jnp.einsum("tnh,tsnh->tns", q.astype(jnp.float32), k,
                           precision="highest"), scale, softcap)
    ctx = jnp.where(seq >= 0, context_lens[jnp.maximum(seq, 0)], 0)
    pos = jnp.where(seq >= 0, q_positions, -1)
    mask = _visible(jnp.arange(k.shape[1])[None, None, :], pos[:, None, None],
                    ctx[:, None, None], sliding_window)
    w = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    w = jnp.where(jnp.any(mask, axis=-1, keepdims=True), w, 0.0)
    return jnp.einsum("tns,tsnh->tnh", w, v, precision="highest").astype(q.dtype)


def _gpu_kernel(lo_ref, hi_ref, ctx_ref, win_ref, pages_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *,
                scale, softcap, windowed, pages_per_block):
    """One (query block, kv head): rows are block_q tokens x G heads; loop over its kv blocks.

    k_ref/v_ref are the whole pool for this kv head ([P, page_size, H]); on GPU that is only a
    pointer, and each step loads just the pages_per_block pages the page table names.
    """
    rows, h = q_ref.shape
    block_kv = pages_per_block * k_ref.shape[1]
    q = q_ref[...]
    pos = pos_ref[...][:, None]  # [R, 1]
    ctx = ctx_ref[0]
    sliding_window = win_ref[0] if windowed else None

    def body(j, carry):
        m, l, acc = carry
        ids = pages_ref[pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[ids].reshape(block_kv, h).astype(q.dtype)  # a pool may be narrower than q
        v = v_ref[ids].reshape(block_kv, h).astype(q.dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        kv_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        mask = _visible(kv_pos, pos, ctx, sliding_window)
        p, alpha, m, l = _softmax_step(_logits(s, scale, softcap), mask, m, l)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return m, l, alpha * acc + pv

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, h), jnp.float32))
    _, l, acc = lax.fori_loop(lo_ref[0], hi_ref[0], body, init)
    o_ref[...] = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def _pallas_gpu(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, *,
                scale, block_q, sliding_window, softcap, block_kv, interpret, layer=None):
    """Launch `_gpu_kernel` over grid (query block, kv head); GQA heads share each page load."""
    k_pages, v_pages, offset = _flat_pool(k_pages, v_pages, layer)
    windowed, win = _window_arg(sliding_window)
    t, n, h = q.shape
    num_pages, page_size, kh, _ = k_pages.shape
    g, nb = n // kh, t // block_q
    for name, value in (("head dim H", h), ("block_kv", block_kv)):
        if value < 16 or value & (value - 1):  # Triton: pow2 tiles, dot dims >= 16
            raise NotImplementedError(f"paged_attention backend='pallas': {name}={value} must "
                                      "be a power of two >= 16")
    pages, ctx, lo, hi = _block_meta(q_block_seq, q_positions, page_table, context_lens,
                                     block_q=block_q, page_size=page_size, block_kv=block_kv,
                                     sliding_window=sliding_window, page_offset=offset)
    # Rows of a program: block_q tokens x G query heads, padded (position -1) to a power of two
    # >= 16 because Triton's dot needs M >= 16; the padding rows output zeros and are dropped.
    r = block_q * g
    rp = max(16, pl.next_power_of_2(r))
    qr = q.reshape(nb, block_q, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(nb, kh, r, h)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
    pos = jnp.repeat(q_positions.reshape(nb, block_q), g, axis=1)
    pos = jnp.pad(pos, ((0, 0), (0, rp - r)), constant_values=-1)

    scalar = pl.BlockSpec((1,), lambda b, k: (b,))
    pool = pl.BlockSpec((num_pages, page_size, _SQ, h), lambda b, k: (0, 0, k, 0))
    tile = pl.BlockSpec((_SQ, _SQ, rp, h), lambda b, k: (b, k, 0, 0))
    kernel = functools.partial(_gpu_kernel, scale=float(scale), softcap=softcap,
                               windowed=windowed, pages_per_block=block_kv // page_size)
    out = pl.pallas_call(
        kernel,
        grid=(nb, kh),
        in_specs=[scalar, scalar, scalar, pl.BlockSpec((1,), lambda b, k: (0,)),
                  pl.BlockSpec((_SQ, pages.shape[1]), lambda b, k: (b, 0)),
                  pl.BlockSpec((_SQ, rp), lambda b, k: (b, 0)),
                  tile, pool, pool],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct((nb, kh, rp, h), q.dtype),
        compiler_params=None if interpret else _triton_params(),
        interpret=interpret,
        name="paged_attention",
    )(lo, hi, ctx, win, pages, pos, qr, k_pages, v_pages)
    out = out[:, :, :r].reshape(nb, kh, block_q, g, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(t, n, h)


def _tpu_kernel(lo_ref, hi_ref, ctx_ref, pages_ref, win_ref, pos_ref, q_ref, *refs, scale, softcap,
                windowed, pages_per_block):
    """Grid step (query block b, kv block j): fold the block's pages into VMEM accumulators.

    Pages arrive as pages_per_block separate [page_size, K*H] tiles (one BlockSpec each, indexed
    through the scalar-prefetched page table), so the pipeline DMAs exactly the pages used.
    """
    k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block:2 * pages_per_block]
    o_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_block:]
    b, j = pl.program_id(0), pl.program_id(1)
    kh, rows, h = q_ref.shape
    block_kv = pages_per_block * k_refs[0].shape[0]
    sliding_window = win_ref[0] if windowed else None

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo_ref[b]) & (j < hi_ref[b]))
    def _step():
        k = jnp.concatenate([r[...] for r in k_refs], axis=0).astype(q_ref.dtype)  # [block_kv, K*H]
        v = jnp.concatenate([r[...] for r in v_refs], axis=0).astype(q_ref.dtype)
        kv_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        mask = _visible(kv_pos, pos_ref[...], ctx_ref[b], sliding_window)
        for i in range(kh):  # static: kv head i's columns are a lane-aligned slice
            ki, vi = k[:, i * h:(i + 1) * h], v[:, i * h:(i + 1) * h]
            s = lax.dot_general(q_ref[i], ki, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
            p, alpha, m_sc[i], l_sc[i] = _softmax_step(_logits(s, scale, softcap), mask,
                                                       m_sc[i], l_sc[i])
            pv = lax.dot_general(p.astype(vi.dtype), vi, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            acc_sc[i] = alpha * acc_sc[i] + pv

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        l = l_sc[...]
        out = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0)
        o_ref[...] = out.astype(o_ref.dtype)


def _pallas_tpu(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, *,
                scale, block_q, sliding_window, softcap, block_kv, interpret, layer=None):
    """Launch `_tpu_kernel` over grid (query block, kv block) with the page table in SMEM.

    kv steps outside a block's [lo, hi) range repeat the previous page index, so the pipeline
    issues no DMA for them, and `pl.when` skips their compute.
    """
    from jax.experimental.pallas import tpu as pltpu

    k_pages, v_pages, offset = _flat_pool(k_pages, v_pages, layer)
    windowed, win = _window_arg(sliding_window)
    t, n, h = q.shape
    num_pages, page_size, kh, _ = k_pages.shape
    g, nb, ppb = n // kh, t // block_q, block_kv // page_size
    pages, ctx, lo, hi = _block_meta(q_block_seq, q_positions, page_table, context_lens,
                                     block_q=block_q, page_size=page_size, block_kv=block_kv,
                                     sliding_window=sliding_window, page_offset=offset)
    width, steps = pages.shape[1], pages.shape[1] // ppb
    r = block_q * g
    rp = -(-r // 16) * 16  # whole bf16 sublane tiles
    qr = q.reshape(nb, block_q, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(nb, kh, r, h)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
    pos = jnp.repeat(q_positions.reshape(nb, block_q), g, axis=1)
    pos = jnp.pad(pos, ((0, 0), (0, rp - r)), constant_values=-1)[..., None]  # [B, R, 1]

    def page_spec(i):
        def index(b, j, lo, hi, ctx, pages, win):
            jj = jnp.maximum(jnp.minimum(j, hi[b] - 1), lo[b])  # park outside [lo, hi)
            return pages[b * width + jj * ppb + i], 0, 0
        return pl.BlockSpec((_SQ, page_size, kh * h), index)

    kernel = functools.partial(_tpu_kernel, scale=float(scale), softcap=softcap,
                               windowed=windowed, pages_per_block=ppb)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(nb, steps),
        in_specs=[pl.BlockSpec((_SQ, rp, 1), lambda b, j, *_: (b, 0, 0)),
                  pl.BlockSpec((_SQ, kh, rp, h), lambda b, j, *_: (b, 0, 0, 0)),
                  *[page_spec(i) for i in range(ppb)] * 2],
        out_specs=pl.BlockSpec((_SQ, kh, rp, h), lambda b, j, *_: (b, 0, 0, 0)),
        scratch_shapes=[pltpu.VMEM((kh, rp, 1), jnp.float32),
                        pltpu.VMEM((kh, rp, 1), jnp.float32),
                        pltpu.VMEM((kh, rp, h), jnp.float32)])
    flat = (num_pages, page_size, kh * h)  # free reshape: a page is one contiguous DMA
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((nb, kh, rp, h), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_attention_tpu",
    )(lo, hi, ctx, pages.reshape(-1), win, pos, qr,
      *[k_pages.reshape(flat)] * ppb, *[v_pages.reshape(flat)] * ppb)
    out = out[:, :, :r].reshape(nb, kh, block_q, g, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(t, n, h)


def _triton_params():
    """Pin the Triton lowering (JAX 0.10's GPU default; deprecated, still present, in 0.11)."""
    from jax.experimental.pallas import triton as pltriton  # lazy: warns on JAX >= 0.11

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def paged_attention(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, *,
                    scale: float, block_q: int, sliding_window: int | jax.Array | None = None,
                    softcap: float | None = None, backend: str = "xla", interpret: bool = False,
                    block_kv: int | None = None, layer: jax.Array | None = None, return_pool: bool = False):
    """Paged GQA attention of a step's query blocks over the page pool.

    q f[T, N, H]; k_pages, v_pages f[P, page_size, K, H], or f[L, P, page_size, K, H] with
    `layer` i32[] the layer to read; q_block_seq i32[T // block_q] (row of page_table, -1 =
    padding block); q_positions i32[T] (-1 = padding token); page_table i32[S, max_pages];
    context_lens i32[S]; sliding_window None, an int, or an i32[] array (per-layer data).
    The pools may hold a narrower float than q (a bfloat16 KV cache under a float32 model), or on
    the XLA path uint16 bfloat16 bits; each block read is widened to q's dtype.
    Returns f[T, N, H] in q.dtype; padding rows are 0 (with `return_pool`, (out, k_pages,
    v_pages): use the returned pools from then on; see `ref_paged_attention`). backend "xla"
    runs `ref_paged_attention`, "pallas" the kernel (`interpret=True` on CPU).
    """
    if isinstance(sliding_window, int) or sliding_window is None:
        return _paged_attention_static(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens,
                                       layer, scale=scale, block_q=block_q, sliding_window=sliding_window,
                                       softcap=softcap, backend=backend, interpret=interpret, block_kv=block_kv,
                                       return_pool=return_pool)
    return _paged_attention_traced(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens,
                                   layer, sliding_window, scale=scale, block_q=block_q, softcap=softcap,
                                   backend=backend, interpret=interpret, block_kv=block_kv, return_pool=return_pool)


_STATIC = ("scale", "block_q", "softcap", "backend", "interpret", "block_kv", "return_pool")


@functools.partial(jax.jit, static_argnames=_STATIC + ("sliding_window",))
def _paged_attention_static(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, layer,
                            **kw):
    return _dispatch(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, layer=layer, **kw)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _paged_attention_traced(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, layer,
                            sliding_window, **kw):
    return _dispatch(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, layer=layer,
                     sliding_window=sliding_window, **kw)


def _dispatch(q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens, *, scale, block_q,
              sliding_window, softcap, backend, interpret, block_kv, layer, return_pool):
    if backend not in _BACKENDS:
        raise ValueError(f"paged_attention: backend={backend!r} must be one of {_BACKENDS}")
    args = (q, k_pages, v_pages, q_block_seq, q_positions, page_table, context_lens)
    if backend == "xla":
        return ref_paged_attention(*args, scale=scale, block_q=block_q,
                                   sliding_window=sliding_window, softcap=softcap,
                                   block_kv=block_kv, layer=layer, return_pool=return_pool)
    if k_pages.dtype == jnp.uint16:
        raise ValueError("paged_attention: uint16 (bfloat16 bits) pools are the XLA path's; the Pallas kernels "
                         "take bfloat16 pools")
    # The Pallas flavour follows the platform: Mosaic TPU on TPU, else the GPU (Triton) kernel,
    # which is also the one `interpret=True` runs on CPU.
    on_tpu = jax.default_backend() == "tpu"
    block_kv = _check_inputs(*args, scale=scale, block_q=block_q, sliding_window=sliding_window,
                             softcap=softcap, block_kv=block_kv,
                             default_tokens=128 if on_tpu else 64, layer=layer)
    impl = _pallas_tpu if on_tpu else _pallas_gpu
    out = impl(*args, scale=scale, block_q=block_q, sliding_window=sliding_window,
               softcap=softcap, block_kv=block_kv, interpret=interpret, layer=layer)
    return (out, k_pages, v_pages) if return_pool else out
