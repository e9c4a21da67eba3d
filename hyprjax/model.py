"""The decoder: Qwen3, Qwen2/2.5 and Gemma 3 (text) in one Flax NNX model, picked by config flags.

Layers are stacked on GPU/TPU: every per-layer weight carries a leading layer axis `[L, ...]` and
the decoder runs them with one `lax.scan`, so compile time and compiled code do not grow with
depth. On CPU they are separate arrays run by a Python loop (`scan_layers=False`, the default
there): XLA:CPU copies each layer's weights out of a stack before its matmuls, which made
weight-bound decode 2.5-3.5x slower (docs/engine.md). Either way, what differs between layers
(Gemma 3's sliding/global pattern: window, RoPE base and scaling) is per-layer data, never a
Python branch on the layer.

The model holds weights only and knows no engine. Its two seams are injected functions:

  * `attention(q, k, v, positions, layer, kv) -> (out, kv)`: how a layer's queries see keys
    and values. The default, `causal_attention`, is dense causal attention over the call's own
    tokens (no cache: parity tests, training). The engine passes paged attention over its KV
    pool (`kv`, carried through the scan, so a stacked `[L, ...]` pool is updated in place).
  * `adapter(module, layer, x, y) -> y`: what each linear layer adds to its base output `y` for
    input `x` (LoRA, sparse deltas, mixes). `layer.adapter` is this layer's slice of
    `adapter.per_layer` (a pytree with a leading layer axis, or None), sliced by the scan.

Shapes use the project's einsum letters (B batch, T tokens, N query heads, K kv heads,
G = N / K, H head dim, D model, F ffn, V vocab, L layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .qformat import QFormat, dequantize
from .quant import qdot
from .rope import apply_rope, rope_frequencies, rope_tables

NO_WINDOW = 1 << 30  # the window of a global layer in a model that also has sliding layers


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Layer:
    """What a seam knows of the layer calling it."""

    index: jax.Array  # i32[] the layer's index (traced inside the scan)
    window: jax.Array | None  # i32[] sliding window (NO_WINDOW on global layers); None: no layer slides
    adapter: Any = None  # this layer's slice of the adapter's per-layer state
    scale: float = field(default=1.0, metadata=dict(static=True))  # attention logit scale
    softcap: float | None = field(default=None, metadata=dict(static=True))  # attention logit soft-cap


AttentionFn = Callable[..., tuple[jax.Array, Any]]
"""(q f[B, T, N, H], k f[B, T, K, H], v f[B, T, K, H], positions i32[B, T], layer, kv) -> (f[B, T, N, H], kv)"""


class Adapter(Protocol):
    """Adds a module's adapter output: `y f[B, T, dout] + delta(x f[B, T, din])`."""

    per_layer: Any  # pytree of [L, ...] arrays sliced by the layer scan into `layer.adapter`, or None

    def __call__(self, module: str, layer: Layer, x: jax.Array, y: jax.Array) -> jax.Array: ...


def causal_attention(q, k, v, positions, layer: Layer, kv=None, *, segments=None):
    """Dense causal GQA attention among the call's own tokens; `kv` is passed through unused.

    A token at position p sees the tokens of its row at positions s <= p (and p - s < window);
    padding (position < 0) sees nothing and outputs zeros. `segments` i32[B, T] (training on
    packed rows, bound with functools.partial) keeps each token to its own document's keys. The G query heads sharing a kv head
    are stacked with the tokens ([B, K, G*T, H]) so both products are plain batched matmuls.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    # k and v as [B, K, S, H] too: batch dims leading makes every product (and its transposes in
    # a backward pass) a plain batched GEMM; a middle batch dim costs XLA:CPU ~2x (training).
    kt, vt = k.astype(q.dtype).transpose(0, 2, 1, 3), v.astype(q.dtype).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqh,bksh->bkqs", qg, kt, preferred_element_type=jnp.float32)
    scores = scores * layer.scale
    if layer.softcap:
        scores = jnp.tanh(scores / layer.softcap) * layer.softcap
    s = positions[:, None, :]  # [B, 1, T] key positions
    p = jnp.tile(positions, (1, g))[:, :, None]  # [B, G*T, 1], same (g, t) order as qg
    visible = (s <= p) & (s >= 0) & (p >= 0)
    if layer.window is not None:
        visible &= p - s < layer.window
    if segments is not None:
        visible &= segments[:, None, :] == jnp.tile(segments, (1, g))[:, :, None]
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.isnan(probs), 0.0, probs)  # rows of padding see nothing
    out = jnp.einsum("bkqs,bksh->bkqh", probs.astype(q.dtype), vt, preferred_element_type=jnp.float32)
    return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype), kv


def _no_adapter(module, layer, x, y):
    return y


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout), dtype) * din ** -0.5)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None
        self.qfmt = None  # a QFormat once quantized: `kernel` then holds codes [dout, din] (hyprjax/qformat.py)
        self.qscale = self.qsub = self.qmin = self.qmsub = nnx.data(None)

    def __call__(self, x):
        if self.qfmt is not None:
            y = qdot(x, self.qfmt, quantized(self)).astype(x.dtype)
            return y if self.bias is None else y + self.bias[...]
        w = self.kernel[...]
        y = jnp.dot(x.astype(w.dtype), w, preferred_element_type=w.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y



def set_quantized(module, attr: str, fmt: QFormat, q: dict) -> None:
    """Make `module` (a Linear, or the Embed with attr "embedding") hold the quantized matrix
    (fmt, q): codes in `attr`, scales in `qscale`/`qsub`/`qmin`/`qmsub` (None where absent)."""
    module.qfmt = fmt
    setattr(module, attr, nnx.Param(q["codes"]))
    for field in ("scale", "sub", "min", "msub"):
        value = q.get(field)
        setattr(module, "q" + field, nnx.data(None if value is None else nnx.Param(value)))


def quantized(module, attr: str = "kernel") -> dict:
    """The arrays of a quantized module as qformat's dict (codes, scale, sub, min, msub)."""
    q = {"codes": getattr(module, attr)[...]}
    for field in ("scale", "sub", "min", "msub"):
        var = getattr(module, "q" + field, None)
        q[field] = None if var is None else var[...]
    return q


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Projections, q/k norms and RoPE; how queries meet keys is the injected `attention`."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
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

    def __call__(self, x, positions, rope, layer: Layer, attention: AttentionFn, adapter, kv):
        """x f[B, T, D], positions i32[B, T] (negative = padding), rope (inv_freq f32[H/2], scale f32[])."""
        b, t, _ = x.shape
        q = adapter("q_proj", layer, x, self.q_proj(x)).reshape(b, t, self.num_heads, self.head_dim)
        k = adapter("k_proj", layer, x, self.k_proj(x)).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = adapter("v_proj", layer, x, self.v_proj(x)).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        tables = rope_tables(positions, *rope)
        q, k = apply_rope(q, tables), apply_rope(k, tables)
        out, kv = attention(q, k, v, positions, layer, kv)
        out = out.reshape(b, t, -1)
        return adapter("o_proj", layer, out, self.o_proj(out)), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=False, dtype=dtype, rngs=rngs)
        self.gelu = cfg.activation == "gelu_tanh"

    def __call__(self, x, layer: Layer, adapter):
        g = adapter("gate_proj", layer, x, self.gate_proj(x))
        g = jax.nn.gelu(g, approximate=True) if self.gelu else jax.nn.silu(g)
        h = g * adapter("up_proj", layer, x, self.up_proj(x))
        return adapter("down_proj", layer, h, self.down_proj(h))


class Block(nnx.Module):
    """One decoder layer; the model holds all of them stacked (`nnx.vmap` at init)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        if cfg.sandwich_norm:
            self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
            self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        else:
            self.post_attn_norm = self.post_mlp_norm = None

    def __call__(self, x, positions, rope, layer: Layer, attention: AttentionFn, adapter, kv):
        h, kv = self.attn(self.attn_norm(x), positions, rope, layer, attention, adapter, kv)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x), layer, adapter)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h, kv


def layer_data(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Per-layer constants scanned with the weights: RoPE inverse frequencies and scale, window."""
    freqs, scales, windows = [], [], []
    for sliding in cfg.is_sliding:
        theta = cfg.rope_local_theta if (sliding and cfg.rope_local_theta) else cfg.rope_theta
        scaling = None if sliding else cfg.rope_scaling  # Gemma 3 scales only its global layers
        inv_freq, scale = rope_frequencies(cfg.head_dim, theta, scaling, cfg.max_position_embeddings)
        freqs.append(inv_freq)
        scales.append(scale)
        windows.append(cfg.sliding_window if sliding else NO_WINDOW)
    out = dict(inv_freq=np.stack(freqs), rope_scale=np.asarray(scales, np.float32))
    if any(cfg.is_sliding):
        out["window"] = np.asarray(windows, np.int32)
    return out


class Model(nnx.Module):
    """Decoder-only LM. Weights only; see `__call__`."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, scan_layers: bool | None = None):
        """`scan_layers` None: the platform's layout (`default_scan_layers`)."""
        self.cfg = cfg
        if scan_layers is None:
            scan_layers = default_scan_layers()
        d = cfg.hidden_size
        self.embed = nnx.Embed(cfg.vocab_size, d, dtype=dtype, param_dtype=dtype, rngs=rngs)
        if scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return Block(cfg, dtype=dtype, rngs=rngs)

            self.layers = stacked(rngs)  # every leaf [L, ...]
        else:
            self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(d, cfg.vocab_size, bias=False, dtype=dtype,
                                                                    rngs=rngs)

    def __call__(self, tokens, positions, *, attention: AttentionFn = causal_attention, kv=None,
                 adapter: Adapter | None = None, logit_index=None, remat: int = 0, remat_policy=None):
        """tokens, positions: i32[B, T] (position < 0: padding); logit_index: i32[B, R] or None.

        Returns (logits f32[B, T, V], or f32[B, R, V] at the tokens `logit_index` names; kv as
        the attention seam returned it). `remat` N > 0 (training) keeps only the input of every
        group of N layers for the backward pass and recomputes the rest (`jax.checkpoint` with
        `remat_policy`, default `nothing_saveable`); N must divide the number of layers.
        """
        cfg = self.cfg
        x = self.embed_tokens(tokens)
        data = layer_data(cfg)
        per_layer = None if adapter is None else adapter.per_layer

        def body(carry, xs):
            x, kv = carry
            block, index, data, adapter_slice = xs
            block = nnx.merge(graphdef, block)
            return run_layer(cfg, block, x, positions, index, data, attention=attention, adapter=adapter, kv=kv,
                             adapter_slice=adapter_slice), None

        n = remat or 1
        if cfg.num_layers % n:
            raise ValueError(f"remat groups of {n} layers do not divide the model's {cfg.num_layers} layers")
        if isinstance(self.layers, nnx.List):  # separate per-layer weights: a Python loop (CPU)
            graphdef = nnx.graphdef(self.layers[0])  # every layer has the same structure

            def group(carry, layers):
                for xs in layers:
                    carry, _ = body(carry, xs)
                return carry

            if remat:
                group = jax.checkpoint(group, policy=remat_policy or jax.checkpoint_policies.nothing_saveable)
            carry = (x, kv)
            for g in range(0, cfg.num_layers, n):
                layers = [(nnx.state(self.layers[i]), jnp.int32(i), jax.tree.map(lambda a, i=i: a[i], data),
                           jax.tree.map(lambda a, i=i: a[i], per_layer)) for i in range(g, g + n)]
                carry = group(carry, layers)
            x, kv = carry
        else:
            graphdef, stacked = nnx.split(self.layers)
            xs = (stacked, jnp.arange(cfg.num_layers, dtype=jnp.int32), data, per_layer)
            if remat:  # an outer scan over groups of n layers, each group one checkpointed inner scan
                grouped = jax.tree.map(lambda a: a.reshape(cfg.num_layers // n, n, *a.shape[1:]), xs)
                inner = jax.checkpoint(lambda carry, xs: jax.lax.scan(body, carry, xs),
                                       policy=remat_policy or jax.checkpoint_policies.nothing_saveable)
                (x, kv), _ = jax.lax.scan(inner, (x, kv), grouped)
            else:
                (x, kv), _ = jax.lax.scan(body, (x, kv), xs)
        return self.logits(x, logit_index), kv

    @property
    def compute_dtype(self):
        """The activations' dtype (the final norm's): the KV pool's too. Weights may be int8."""
        return self.norm.scale.dtype

    def embed_tokens(self, tokens):
        """tokens i32[B, T] -> the first layer's input f[B, T, D]."""
        fmt = getattr(self.embed, "qfmt", None)
        if fmt is not None:  # gather the quantized rows, then dequantize only those
            rows = {k: None if v is None else v[tokens] for k, v in quantized(self.embed, "embedding").items()}
            x = dequantize(fmt, rows).astype(self.compute_dtype)
        else:
            x = self.embed(tokens)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
        return x

    def logits(self, x, logit_index=None):
        """The last layer's output f[B, T, D] -> logits f32[B, T, V] (or f32[B, R, V] at `logit_index`)."""
        cfg = self.cfg
        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, :, None], axis=1)  # [B, R, D]
        x = self.norm(x)
        fmt = getattr(self.embed, "qfmt", None)
        if self.lm_head is None and fmt is not None:
            logits = qdot(x, fmt, quantized(self.embed, "embedding"))
        elif self.lm_head is None:
            w = self.embed.embedding[...]
            logits = jnp.einsum("...d,vd->...v", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        if cfg.final_logit_softcap:
            cap = cfg.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits


def run_layer(cfg: ModelConfig, block: Block, x, positions, index, data: dict, *, attention: AttentionFn, adapter,
              kv, adapter_slice=None):
    """One decoder layer: `block` (a `Block`) at layer `index` with that layer's `layer_data` row.

    `Model.__call__` runs every layer through this; an engine may also run the layers one call
    at a time (engine/layerwise.py). Returns (x, kv).
    """
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    layer = Layer(index, data.get("window"), adapter_slice, scale=scale, softcap=cfg.attn_logit_softcap)
    rope = (data["inv_freq"], data["rope_scale"])
    return block(x, positions, rope, layer, attention, _no_adapter if adapter is None else adapter, kv)


def abstract_model(cfg: ModelConfig, dtype, scan_layers: bool | None = None) -> Model:
    """The model with ShapeDtypeStruct leaves: real sizes cost nothing until weights are set."""
    return nnx.eval_shape(lambda: Model(cfg, dtype=dtype, rngs=nnx.Rngs(0), scan_layers=scan_layers))


def default_scan_layers() -> bool:
    """Stack and scan the layers on GPU/TPU; separate arrays and a Python loop on CPU (module doc)."""
    return jax.default_backend() != "cpu"
