"""The decoder: Qwen3, Qwen2/2.5 and Gemma 3 (text) in one Flax NNX model, picked by config flags.

The model holds weights only. The KV cache is passed in and returned (functional), so the
jitted step can donate it and the paged engine can swap in its own cache layout. Layers follow
`__call__(x, positions, cache, ...) -> (y, cache)`; shapes use the project's einsum letters
(B batch, T tokens, S cache slots, N query heads, K kv heads, G = N / K, H head dim, D model,
F ffn, V vocab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ModelConfig
from .kernels.lora import LoraPairs, lora_apply
from .kernels.paged_attention import paged_attention
from .rope import apply_rope, rope_frequencies


class LayerCache(NamedTuple):
    """Contiguous KV cache of one layer: slot s holds the key/value of position s."""

    k: jax.Array  # [B, S, K, H]
    v: jax.Array  # [B, S, K, H]


class PagedLayerCache(NamedTuple):
    """One layer's share of the paged KV pool: page p holds `page_size` consecutive positions."""

    k: jax.Array  # [P, page_size, K, H]
    v: jax.Array  # [P, page_size, K, H]


KVCache = tuple  # tuple[LayerCache | PagedLayerCache, ...], one per layer


@dataclass
class PagedMeta:
    """Where a flattened step's tokens go in the paged pool and whom they attend to.

    Tokens are laid out as [Td decode tokens | Tp prefill tokens]; prefill tokens come in query
    blocks of `block_q` rows, each block of one sequence (kernels/paged_attention.py).
    """

    slot_mapping: jax.Array  # i32[T] pool slot (page * page_size + offset) of each token; -1 = padding
    dec_block_seq: jax.Array  # i32[Td] page_table row of each decode token; -1 = padding
    pf_block_seq: jax.Array  # i32[Tp // block_q] page_table row of each prefill block; -1 = padding
    page_table: jax.Array  # i32[R, max_pages]
    context_lens: jax.Array  # i32[R] tokens in the cache per row, this step's included
    block_q: int = 16
    backend: str = "xla"  # "xla" | "pallas"
    interpret: bool = False


jax.tree_util.register_dataclass(
    PagedMeta, data_fields=["slot_mapping", "dec_block_seq", "pf_block_seq", "page_table", "context_lens"],
    meta_fields=["block_q", "backend", "interpret"])


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


class LayerLora(NamedTuple):
    """One layer's view of a LoraStep, handed down to its linear layers."""

    layer: int
    step: LoraStep
    meta: PagedMeta

    def __call__(self, name: str, x, y):
        """y [1, T, dout] + the LoRA deltas of module `name` for x [1, T, din]."""
        a, b = self.step.tables[name]
        meta = self.meta
        out = lora_apply(y[0], x[0], a, b, self.step.dec, self.step.pf, layer=self.layer,
                         td=meta.dec_block_seq.shape[0], block_q=meta.block_q, backend=meta.backend,
                         interpret=meta.interpret)
        return out[None]


def _no_lora(name, x, y):
    return y


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> KVCache:
    """Zero-filled pool (never-written slots must be finite: masked reads multiply them by 0)."""
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return tuple(PagedLayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype) -> KVCache:
    shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout), dtype) * din ** -0.5)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x):
        w = self.kernel[...]
        y = jnp.dot(x.astype(w.dtype), w, preferred_element_type=w.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h
        self.q_proj = Linear(d, cfg.num_heads * h, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * h, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * h, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * h, d, bias=False, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        sliding = cfg.is_sliding[layer]
        self.window = cfg.sliding_window if sliding else None
        theta = cfg.rope_local_theta if (sliding and cfg.rope_local_theta) else cfg.rope_theta
        scaling = None if sliding else cfg.rope_scaling  # Gemma 3 scales only its global layers
        # Static RoPE settings (no arrays on the module: NNX would treat them as state).
        self.rope = (h, theta, scaling, cfg.max_position_embeddings)
        self.scale = (cfg.query_pre_attn_scalar or h) ** -0.5
        self.softcap = cfg.attn_logit_softcap

    def __call__(self, x, positions, cache, kv_len=None, meta: PagedMeta | None = None, lora=_no_lora):
        """x: [B, T, D], positions: i32[B, T] (negative = padding, not written) -> ([B, T, D], cache).

        With a PagedLayerCache, B is 1 and `meta` says where each token lives and what it sees;
        `lora` (a LayerLora) adds each token's adapter deltas to the projections.
        """
        b, t, _ = x.shape
        q = lora("q_proj", x, self.q_proj(x)).reshape(b, t, self.num_heads, self.head_dim)
        k = lora("k_proj", x, self.k_proj(x)).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = lora("v_proj", x, self.v_proj(x)).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, rope_scale = rope_frequencies(*self.rope)
        q = apply_rope(q, positions, inv_freq, rope_scale)
        k = apply_rope(k, positions, inv_freq, rope_scale)
        if isinstance(cache, PagedLayerCache):
            cache = write_pages(cache, k[0], v[0], meta.slot_mapping)
            out = self._paged(q[0], cache, positions[0], meta)[None]
        else:
            cache = write_cache(cache, k, v, positions)
            out = cached_attention(q, cache, positions, scale=self.scale, window=self.window, softcap=self.softcap,
                                   kv_len=kv_len)
        out = out.reshape(b, t, -1)
        return lora("o_proj", out, self.o_proj(out)), cache

    def _paged(self, q, cache: PagedLayerCache, positions, meta: PagedMeta):
        """q [T, N, H] -> [T, N, H]: decode tokens with block_q=1, prefill blocks with meta.block_q."""
        td = meta.dec_block_seq.shape[0]
        kw = dict(scale=self.scale, sliding_window=self.window, softcap=self.softcap, backend=meta.backend,
                  interpret=meta.interpret)
        parts = []
        if td:
            parts.append(paged_attention(q[:td], cache.k, cache.v, meta.dec_block_seq, positions[:td],
                                         meta.page_table, meta.context_lens, block_q=1, **kw))
        if q.shape[0] > td:
            parts.append(paged_attention(q[td:], cache.k, cache.v, meta.pf_block_seq, positions[td:],
                                         meta.page_table, meta.context_lens, block_q=meta.block_q, **kw))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def write_cache(cache: LayerCache, k, v, positions) -> LayerCache:
    """Scatter k/v [B, T, K, H] to their positions; padding (position < 0 or >= S) is dropped."""
    b, t = positions.shape
    slots = cache.k.shape[1]
    pos = jnp.where((positions >= 0) & (positions < slots), positions, slots)  # slots = out of bounds
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return LayerCache(cache.k.at[rows, pos].set(k.astype(cache.k.dtype), mode="drop"),
                      cache.v.at[rows, pos].set(v.astype(cache.v.dtype), mode="drop"))


def cached_attention(q, cache: LayerCache, positions, *, scale, window=None, softcap=None, kv_len=None):
    """Causal GQA attention of q [B, T, N, H] over the cache [B, S, K, H] -> [B, T, N, H].

    Slot s is visible to a query at position p when s <= p (and p - s < window on sliding
    layers). Every slot at or before p was written by this sequence, so no lengths are needed.
    `kv_len` (static) limits attention to the first kv_len slots when the caller knows no query
    sees past them (a prefill into an empty cache), saving the masked work.

    Layout: the G query heads sharing a kv head are stacked with the tokens ([B, K, G*T, H]) so
    both products are plain batched matmuls; XLA:CPU ran this ~2x faster than the 5-D einsum.
    """
    b, t, n, h = q.shape
    kh = cache.k.shape[2]
    g = n // kh
    k, v = cache.k, cache.v
    if kv_len is not None and kv_len < k.shape[1]:
        k, v = k[:, :kv_len], v[:, :kv_len]
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    scores = jnp.einsum("bkqh,bskh->bkqs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    s = jnp.arange(k.shape[1])
    p = jnp.tile(positions, (1, g))[:, :, None]  # [B, G*T, 1], same (g, t) order as qg
    visible = s[None, None, :] <= p
    if window:
        visible &= s[None, None, :] > p - window
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.isnan(probs), 0.0, probs)  # rows of padding see nothing
    out = jnp.einsum("bkqs,bskh->bkqh", probs.astype(q.dtype), v.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def write_pages(cache: PagedLayerCache, k, v, slot_mapping) -> PagedLayerCache:
    """Scatter k/v [T, K, H] into the pool at `slot_mapping`; -1 (padding) is dropped."""
    p, ps, kh, h = cache.k.shape
    slots = jnp.where(slot_mapping >= 0, slot_mapping, p * ps)  # out of bounds -> dropped
    kf = cache.k.reshape(p * ps, kh, h).at[slots].set(k.astype(cache.k.dtype), mode="drop")
    vf = cache.v.reshape(p * ps, kh, h).at[slots].set(v.astype(cache.v.dtype), mode="drop")
    return PagedLayerCache(kf.reshape(p, ps, kh, h), vf.reshape(p, ps, kh, h))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=False, dtype=dtype, rngs=rngs)
        self.gelu = cfg.activation == "gelu_tanh"

    def __call__(self, x, lora=_no_lora):
        g = lora("gate_proj", x, self.gate_proj(x))
        g = jax.nn.gelu(g, approximate=True) if self.gelu else jax.nn.silu(g)
        h = g * lora("up_proj", x, self.up_proj(x))
        return lora("down_proj", h, self.down_proj(h))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        if cfg.sandwich_norm:
            self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
            self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        else:
            self.post_attn_norm = self.post_mlp_norm = None

    def __call__(self, x, positions, cache, kv_len=None, meta=None, lora=_no_lora):
        h, cache = self.attn(self.attn_norm(x), positions, cache, kv_len, meta, lora)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x), lora)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h, cache


class Model(nnx.Module):
    """Decoder-only LM. Weights only; see `forward` for the call."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed = nnx.Embed(cfg.vocab_size, d, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(d, cfg.vocab_size, bias=False, dtype=dtype,
                                                                    rngs=rngs)

    def __call__(self, tokens, positions, cache: KVCache, logit_index=None, kv_len=None, meta=None,
                 lora: LoraStep | None = None):
        """tokens, positions: i32[B, T]; logit_index: i32[B] or None; kv_len: static bound on visible slots;
        meta: PagedMeta when `cache` is paged (then B = 1 and logit_index indexes the T tokens, i32[R]);
        lora: the step's adapter pairs and slot tables (paged steps only; None = base model).

        Returns (logits f32[B, T, V] or, with logit_index, f32[B or R, V] at those tokens; cache).
        """
        x = self.embed(tokens)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
        new_cache = []
        if lora is not None and meta is None:
            raise ValueError("LoRA deltas need a paged step (meta)")
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache)):
            layer_lora = _no_lora if lora is None else LayerLora(i, lora, meta)
            x, layer_cache = layer(x, positions, layer_cache, kv_len, meta, layer_lora)
            new_cache.append(layer_cache)
        if logit_index is not None and meta is not None:
            x = jnp.take(x[0], logit_index, axis=0)  # [R, D]: each sequence's last token
        elif logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]  # [B, D]
        x = self.norm(x)
        if self.lm_head is None:
            w = self.embed.embedding[...]
            logits = jnp.einsum("...d,vd->...v", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        if self.cfg.final_logit_softcap:
            cap = self.cfg.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits, tuple(new_cache)


def abstract_model(cfg: ModelConfig, dtype) -> Model:
    """The model with ShapeDtypeStruct leaves: real sizes cost nothing until weights are set."""
    return nnx.eval_shape(lambda: Model(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
