"""The engine's side of the model's two seams: paged attention over the KV pool, and LoRA pairs.

The model (hyprjax/model.py) knows no step layout; the runner hands it

  * `PagedAttention(meta)`: writes each layer's new K/V into the stacked pool and attends
    through the page tables (kernels/paged_attention.py);
  * `PagedLora(step, meta)`: adds each token's adapter deltas (kernels/lora.py, and
    kernels/sparse.py for sparse adapters).

A step's T tokens are laid out as [Td decode tokens | Tp prefill tokens]; prefill tokens come in
query blocks of `block_q` rows, each block of one sequence, and decode tokens in blocks of
`dec_block_q` rows (1, or a verify group's K + 1).

Under tensor parallelism (`meta.sharding`, hyprjax/sharding.py) the XLA path needs nothing here:
GSPMD partitions it from its inputs' shardings. A Pallas kernel is opaque to GSPMD, so with
backend "pallas" each kernel runs under `shard_map`:

  * attention splits q heads and the pool's kv heads over the mesh (each device attends its own
    heads, GQA groups stay whole); when kv heads do not divide the mesh, the kernel runs whole
    on every device with q gathered (the pool is replicated then anyway);
  * LoRA follows the slot tables: a column-parallel module (q/k/v/gate/up; b's dout split)
    computes its own dout slice; a row-parallel one (o/down; a's din split) runs the kernel on
    its din slice and sums the partial deltas over the mesh (`psum`; the delta is linear in
    x @ a, so the sum of slices is the whole), so x is never gathered; a module split neither
    way (k/v with replicated kv heads) runs whole on every device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..config import ModelConfig
from ..kernels.lora import LoraPairs, bf16_bits, lora_apply
from ..kernels.sparse import sparse_apply
from ..kernels.paged_attention import paged_attention
from ..model import Layer


class KVPool(NamedTuple):
    """Every layer's pages: page p of layer l holds `page_size` consecutive positions."""

    k: jax.Array  # [L, P, page_size, K, H]
    v: jax.Array  # [L, P, page_size, K, H]


def resolve_kv_dtype(setting: str, compute_dtype, weights_quantized: bool) -> str:
    """The KV values' dtype for `EngineConfig.kv_cache_dtype`: "float32" or "bfloat16" as asked;
    "auto" -> bfloat16 when the model computes in bfloat16 (GPU/TPU) or its weights sit packed
    (int8/int4/keep/keep8: a memory- or speed-first choice made already), else float32, so a
    float model's logits stay exactly what they were (the tests against transformers hold at
    1e-4 to 1e-5).

    Why bfloat16 for quantized models on CPU: a decode step reads every cached K/V of every
    layer, and at long contexts that is the step's largest read. Measured on the default model
    (SmolLM2-135M, int8, 2-core EPYC, batch 1, bench/decode.py): 61 -> 95 tok/s with a 512-token
    prompt, 29 -> 63 with 2,048 (docs/cpu.md, "KV cache dtype"); and the pool holds twice the
    tokens.
    """
    if setting != "auto":
        return setting
    return "bfloat16" if weights_quantized or jnp.dtype(compute_dtype) == jnp.bfloat16 else "float32"


def kv_storage_dtype(kv_dtype, backend: str):
    """The pool's element type for K/V values of `kv_dtype`: bfloat16 on the XLA path is kept as
    its uint16 bits (`kernels.lora.bf16_bits`), widened per gathered block inside attention.

    A bfloat16 pool on XLA:CPU is converted whole to float32 around every update and every read
    (XLA:CPU normalizes bfloat16 scatters and gathers to float32, and moved the convert of each
    gathered block onto the pool itself): a 30-layer decode step ran at 0.4 tok/s. Integers are
    left alone. The Pallas kernels read bfloat16 pools directly (GPU/TPU handle it natively)."""
    kv_dtype = jnp.dtype(kv_dtype)
    return jnp.dtype(jnp.uint16) if kv_dtype == jnp.bfloat16 and backend == "xla" else kv_dtype


def init_kv_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None) -> KVPool:
    """Zero-filled pool (never-written slots must be finite: masked reads multiply them by 0),
    placed with `sharding` (a NamedSharding over kv heads) when given. `dtype` is the storage
    type (`kv_storage_dtype`): uint16 holds bfloat16 bits, whose zero is 0.0."""
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return KVPool(jnp.zeros(shape, dtype, device=sharding), jnp.zeros(shape, dtype, device=sharding))


@jax.tree_util.register_dataclass
@dataclass
class PagedMeta:
    """Where a flattened step's tokens go in the paged pool and whom they attend to."""

    slot_mapping: jax.Array  # i32[T] pool slot (page * page_size + offset) of each token; -1 = padding
    dec_block_seq: jax.Array  # i32[Td // dec_block_q] page_table row of each decode block; -1 = padding
    pf_block_seq: jax.Array  # i32[Tp // block_q] page_table row of each prefill block; -1 = padding
    page_table: jax.Array  # i32[R, max_pages]
    context_lens: jax.Array  # i32[R] tokens in the cache per row, this step's included
    block_q: int = field(default=16, metadata=dict(static=True))
    backend: str = field(default="xla", metadata=dict(static=True))  # "xla" | "pallas"
    interpret: bool = field(default=False, metadata=dict(static=True))
    sharding: Any = field(default=None, metadata=dict(static=True))  # sharding.KernelSharding: Pallas under shard_map
    # Decode rows per attention block: 1, or K + 1 in a verify step on the XLA path, where a
    # sequence's last token and its K drafts attend as one causal block (runner.pack says why).
    dec_block_q: int = field(default=1, metadata=dict(static=True))

    @property
    def num_decode(self) -> int:
        return self.dec_block_seq.shape[0] * self.dec_block_q


def write_pages(pool: KVPool, layer, k, v, slot_mapping) -> KVPool:
    """Scatter one layer's k/v [T, K, H] into the pool at `slot_mapping`; -1 (padding) is dropped.

    The pool is the scan's carry, so the scatter updates it in place.
    """
    _, p, ps, _, _ = pool.k.shape
    page = jnp.where(slot_mapping >= 0, slot_mapping // ps, p)  # out of bounds -> dropped
    offset = slot_mapping % ps
    # Indexed [layer, page, offset] on the 5-D pool: a reshape to [L, P * page_size, ...] here
    # made XLA:CPU copy the whole pool each layer instead of updating it in place.
    def cast(x, dtype):  # a uint16 pool holds bfloat16 bits (kv_storage_dtype)
        return bf16_bits(x) if dtype == jnp.uint16 else x.astype(dtype)

    return KVPool(pool.k.at[layer, page, offset].set(cast(k, pool.k.dtype), mode="drop"),
                  pool.v.at[layer, page, offset].set(cast(v, pool.v.dtype), mode="drop"))


@dataclass(frozen=True)
class PagedAttention:
    """The attention seam of a paged step (B = 1: the step's tokens flattened)."""

    meta: PagedMeta

    def __call__(self, q, k, v, positions, layer: Layer, pool: KVPool):
        meta = self.meta
        pool = write_pages(pool, layer.index, k[0], v[0], meta.slot_mapping)
        q, positions = q[0], positions[0]
        td = meta.num_decode
        kw = dict(scale=layer.scale, sliding_window=layer.window, softcap=layer.softcap, backend=meta.backend,
                  interpret=meta.interpret, layer=layer.index)
        attend = paged_attention
        if meta.sharding is not None and meta.backend == "pallas":
            attend = _sharded_attention(meta.sharding)

        def run(q, pool, block_seq, positions, block_q):
            if attend is not paged_attention:
                return attend(q, pool.k, pool.v, block_seq, positions, meta.page_table, meta.context_lens,
                              block_q=block_q, **kw), pool
            # The pool threads through the attention loop (ref_paged_attention says why).
            out, k, v = paged_attention(q, pool.k, pool.v, block_seq, positions, meta.page_table,
                                        meta.context_lens, block_q=block_q, return_pool=True, **kw)
            return out, KVPool(k, v)

        parts = []
        if td:
            out, pool = run(q[:td], pool, meta.dec_block_seq, positions[:td], meta.dec_block_q)
            parts.append(out)
        if q.shape[0] > td:
            out, pool = run(q[td:], pool, meta.pf_block_seq, positions[td:], meta.block_q)
            parts.append(out)
        out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        return out[None], pool


@jax.tree_util.register_dataclass
@dataclass
class LoraStep:
    """A paged step's adapter work: (token block, slot, weight) pairs per region (kernels/lora.py).

    Decode pairs are one token each, starting in [0, Td); prefill pairs are `block_q`-token
    blocks with starts counted from the first prefill token.
    """

    tables: dict[str, tuple[jax.Array, jax.Array]]  # module -> (a f[L, S, din, R], b f[L, S, R, dout]) (registry.py)
    dec: LoraPairs
    pf: LoraPairs
    # sparse adapters: part ("sparse" | "block") -> module -> (idx, val) (registry.sparse_tables),
    # and each part's own (decode, prefill) pairs: only slots holding that part take part.
    sparse: dict = field(default_factory=dict)
    sparse_pairs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PagedLora:
    """The adapter seam of a paged step: each token block adds its own adapters' deltas.

    The slot tables stay whole ([L, S, ...], `per_layer` None): each pair slices [layer, slot]
    inside its loop, which reads one adapter; a per-layer slice taken by the scan would copy
    every slot's factors each layer (kernels/lora.py, `ref_lora_add`).
    """

    step: LoraStep
    meta: PagedMeta
    per_layer: None = None

    def __call__(self, module: str, layer: Layer, x, y):
        meta = self.meta
        kw = dict(td=meta.num_decode, block_q=meta.block_q, backend=meta.backend, interpret=meta.interpret)
        out = y[0]
        if module in self.step.tables:
            a, b = self.step.tables[module]
            if meta.sharding is not None and meta.backend == "pallas":
                out = _sharded_lora(meta.sharding, module, out, x[0], a, b, self.step.dec, self.step.pf, layer.index,
                                    **kw)
            else:
                out = lora_apply(out, x[0], a, b, self.step.dec, self.step.pf, layer=layer.index, **kw)
        for part, tables in self.step.sparse.items():
            if module in tables:
                idx, val = tables[module]
                dec, pf = self.step.sparse_pairs[part]
                # Under tensor parallelism sparse tables are replicated and GSPMD partitions the
                # XLA path; the Pallas kernel would need a shard_map of its own.
                skw = kw if meta.sharding is None else {**kw, "backend": "xla"}
                out = sparse_apply(out, x[0], part, idx, val, dec, pf, layer=layer.index, **skw)
        return out[None]


def _sharded_attention(plan):
    """`paged_attention` with the Pallas kernel under shard_map (see the module docstring)."""

    def attend(q, k_pages, v_pages, block_seq, positions, page_table, context_lens, *, layer, sliding_window,
               **kw):
        heads = plan.heads
        q_spec, pool_spec = P(None, heads, None), P(None, None, None, heads, None)
        window = sliding_window if isinstance(sliding_window, jax.Array) else None

        def local(q, k_pages, v_pages, block_seq, positions, page_table, context_lens, layer, window):
            return paged_attention(q, k_pages, v_pages, block_seq, positions, page_table, context_lens, layer=layer,
                                   sliding_window=sliding_window if window is None else window, **kw)

        return jax.shard_map(local, mesh=plan.mesh, out_specs=q_spec, check_vma=False,
                             in_specs=(q_spec, pool_spec, pool_spec, P(), P(), P(), P(), P(), P()))(
            q, k_pages, v_pages, block_seq, positions, page_table, context_lens, layer, window)

    return attend


def _sharded_lora(plan, module, y, x, a, b, dec, pf, layer, **kw):
    """`lora_apply` with the Pallas kernels under shard_map: column-parallel modules per dout
    slice, row-parallel ones as a psum of per-din-slice partial deltas (module docstring)."""
    din, dout = plan.lora_axes(module)
    x_spec, y_spec = P(None, din), P(None, dout)
    a_spec, b_spec = P(None, None, din, None), P(None, None, None, dout)

    def local(y, x, a, b, dec, pf, layer):
        if din is None:
            return lora_apply(y, x, a, b, dec, pf, layer=layer, **kw)
        delta = lora_apply(jnp.zeros(y.shape, jnp.float32), x, a, b, dec, pf, layer=layer, **kw)
        return y + jax.lax.psum(delta, din).astype(y.dtype)

    return jax.shard_map(local, mesh=plan.mesh, in_specs=(y_spec, x_spec, a_spec, b_spec, P(), P(), P()),
                         out_specs=y_spec, check_vma=False)(y, x, a, b, dec, pf, layer)
