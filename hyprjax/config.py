"""Model configuration: one frozen dataclass, read from HF `config.json` or GGUF metadata.

Qwen3, Qwen2/2.5, Gemma 3 (text) and Llama (2, 3.x, SmolLM, TinyLlama) run through one model with explicit flags (`qk_norm`,
`qkv_bias`, ...) rather than subclasses; `arch` only picks the defaults for those flags.
Gemma's HF norms scale by (1 + w); llama.cpp's converter folds the 1 into the GGUF weights, and
our SafeTensors loader folds it the same way, so the model has a single plain RMSNorm.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

ARCHITECTURES = ("qwen3", "qwen2", "gemma3", "llama")


@dataclass(frozen=True)
class RopeScaling:
    """Extension of RoPE beyond the trained context (HF `rope_scaling`)."""

    kind: str  # "linear" | "yarn" | "llama3" | "factors"
    factor: float
    original_max_position_embeddings: int | None = None  # yarn: the trained context
    beta_fast: float = 32.0  # yarn: high-frequency boundary (in rotations)
    beta_slow: float = 1.0  # yarn: low-frequency boundary
    attention_factor: float | None = None  # yarn: logit scale; default 0.1*ln(factor)+1
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept
    freq_factors: tuple[float, ...] = ()  # "factors": each inverse frequency divided by its entry
    # (a GGUF's `rope_freqs.weight`, which llama.cpp's converter writes for Llama 3.x)

    def __post_init__(self):
        if self.kind not in ("linear", "yarn", "llama3", "factors"):
            raise ConfigError(f"rope_scaling type {self.kind!r} is not supported (linear, yarn, llama3)")
        if self.kind == "factors" and not all(f > 0 and math.isfinite(f) for f in self.freq_factors or (0,)):
            raise ConfigError("rope frequency factors must be positive and finite")
        if self.kind == "llama3" and not (self.original_max_position_embeddings
                                          and self.high_freq_factor > self.low_freq_factor > 0):
            raise ConfigError("llama3 rope_scaling needs original_max_position_embeddings and "
                              "high_freq_factor > low_freq_factor > 0")
        if not (self.factor >= 1.0 and math.isfinite(self.factor)):
            raise ConfigError(f"rope_scaling factor must be >= 1, got {self.factor}")
        if self.kind == "yarn" and not self.original_max_position_embeddings:
            raise ConfigError("yarn rope_scaling needs original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only model. Every field is validated on creation."""

    arch: str  # "qwen3" | "qwen2" | "gemma3" | "llama": the family, for defaults and file names
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N query heads
    num_kv_heads: int  # K key/value heads (GQA when K < N)
    head_dim: int  # H, independent of D / N
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = True  # Qwen3/Gemma3: RMSNorm over each head of q and k
    max_position_embeddings: int = 40960
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3 only (defaults leave Qwen unchanged).
    embed_scale: bool = False  # multiply embeddings by sqrt(D)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP
    activation: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None -> H
    sliding_window: int | None = None  # window of local layers
    layer_types: tuple[str, ...] = ()  # per layer "full" | "sliding"; () -> all full
    rope_local_theta: float | None = None  # RoPE base of sliding layers
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"architecture {self.arch!r} is not supported ({', '.join(ARCHITECTURES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"config field rope_theta must be positive, got {self.rope_theta}")
        if not (0 < self.rms_norm_eps < 1):
            raise ConfigError(f"config field rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"activation {self.activation!r} is not supported (silu, gelu_tanh)")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            if any(t not in ("full", "sliding") for t in self.layer_types):
                raise ConfigError(f"layer_types entries must be 'full' or 'sliding', got {set(self.layer_types)}")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ConfigError("sliding layers need a positive sliding_window")
        for i in self.eos_token_ids:
            if not 0 <= i < self.vocab_size:
                raise ConfigError(f"eos token id {i} is outside the vocabulary of {self.vocab_size}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend within `sliding_window` only."""
        if not self.layer_types:
            return (False,) * self.num_layers
        return tuple(t == "sliding" for t in self.layer_types)

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    # ---- readers -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """From a HF `config.json` dict (Qwen3ForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM,
        LlamaForCausalLM)."""
        if "text_config" in cfg and cfg.get("model_type") == "gemma3":
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        model_type = cfg.get("model_type")
        arch = {"qwen3": "qwen3", "qwen2": "qwen2", "gemma3_text": "gemma3", "llama": "llama"}.get(model_type)
        if arch is None:
            archs = cfg.get("architectures")
            raise ConfigError(f"model_type {model_type!r} (architectures {archs}) is not supported; "
                              "supported: qwen3, qwen2, gemma3_text, llama")

        def need(key):
            if key not in cfg:
                raise ConfigError(f"config.json has no {key!r}")
            return cfg[key]

        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        heads = need("num_attention_heads")
        common = dict(
            arch=arch,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or need("hidden_size") // heads,
            rope_theta=float(cfg.get("rope_theta", _rope_params(cfg).get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling_from_hf(cfg),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
        )
        if arch == "qwen3":
            return cls(**common, tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                       qk_norm=True, qkv_bias=bool(cfg.get("attention_bias", False)))
        if arch == "qwen2":
            return cls(**common, tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                       qk_norm=False, qkv_bias=True)
        if arch == "llama":
            if cfg.get("mlp_bias"):
                raise ConfigError("llama with mlp_bias=true is not supported (no bias on the MLP projections)")
            if cfg.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"llama with hidden_act={cfg['hidden_act']!r} is not supported (silu)")
            return cls(**common, tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                       qk_norm=False, qkv_bias=bool(cfg.get("attention_bias", False)))
        n = common["num_layers"]
        layer_types = cfg.get("layer_types")
        if not layer_types:
            pattern = cfg.get("sliding_window_pattern", 6)
            layer_types = ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n)]
        layer_types = tuple("sliding" if t == "sliding_attention" or t == "sliding" else "full" for t in layer_types)
        local = cfg.get("rope_local_base_freq", _rope_params(cfg, "sliding_attention").get("rope_theta", 10000.0))
        return cls(**common, tie_word_embeddings=cfg.get("tie_word_embeddings", True), qk_norm=True,
                   qkv_bias=bool(cfg.get("attention_bias", False)), embed_scale=True,
                   sandwich_norm=True, activation="gelu_tanh",
                   query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", common["head_dim"])),
                   sliding_window=cfg.get("sliding_window"), layer_types=layer_types,
                   rope_local_theta=float(local),
                   final_logit_softcap=cfg.get("final_logit_softcapping"),
                   attn_logit_softcap=cfg.get("attn_logit_softcapping"))

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], *, vocab_size: int, tied: bool) -> "ModelConfig":
        """From GGUF key/value metadata (`general.architecture` = qwen3 | qwen2 | gemma3 | llama).

        `vocab_size` and `tied` come from the tensors (token_embd rows; no `output.weight`).
        """
        arch = meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConfigError(f"GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)})")

        def number(full, value, kind):
            """`value` of metadata key `full` as `kind`: a one-line error for text, lists, NaN or overflow."""
            if isinstance(value, (list, tuple)) and value and full.endswith("head_count_kv"):
                value = value[0]  # per-layer counts: the first layer's
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"GGUF metadata {full} must be a number, got {str(value)[:60]!r}")
            if kind is int and value != int(value):
                raise ConfigError(f"GGUF metadata {full} must be an integer, got {value!r}")
            return kind(value)

        def need(key, kind=int):
            full = f"{arch}.{key}"
            if full not in meta:
                raise ConfigError(f"GGUF metadata has no {full!r}")
            return number(full, meta[full], kind)

        def get(key, default=None, kind=None):
            value = meta.get(f"{arch}.{key}", default)
            return value if kind is None or value is None else number(f"{arch}.{key}", value, kind)

        def token(key):
            value = meta.get(f"tokenizer.ggml.{key}_token_id")
            return None if value is None else number(f"tokenizer.ggml.{key}_token_id", value, int)

        heads = need("attention.head_count")
        if heads <= 0:
            raise ConfigError(f"GGUF metadata {arch}.attention.head_count must be positive, got {heads}")
        kv = get("attention.head_count_kv", heads, int)
        d = need("embedding_length")
        scaling = None
        stype = get("rope.scaling.type")
        if stype and stype != "none" and get("rope.scaling.factor", 1.0, float) > 1.0:
            if not isinstance(stype, str):
                raise ConfigError(f"GGUF metadata {arch}.rope.scaling.type must be text, got {stype!r}")
            scaling = RopeScaling(kind=stype, factor=get("rope.scaling.factor", kind=float),
                                  original_max_position_embeddings=get("rope.scaling.original_context_length",
                                                                       kind=int))
        rot = get("rope.dimension_count", kind=int)
        head_dim = get("attention.key_length", d // heads, int)
        if rot is not None and rot != head_dim:
            raise ConfigError(f"GGUF {arch}.rope.dimension_count = {rot} rotates part of a {head_dim}-wide head: "
                              "partial rotary embeddings are not supported")
        eos = token("eos")
        common = dict(
            arch=arch, vocab_size=vocab_size, hidden_size=d,
            intermediate_size=need("feed_forward_length"), num_layers=need("block_count"),
            num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            rope_theta=get("rope.freq_base", 10000.0, float), rope_scaling=scaling,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6, float),
            max_position_embeddings=get("context_length", 32768, int),
            bos_token_id=token("bos"),
            eos_token_ids=() if eos is None else (eos,),
            tie_word_embeddings=tied,
        )
        if arch == "qwen3":
            return cls(**common, qk_norm=True, qkv_bias=False)
        if arch == "qwen2":
            return cls(**common, qk_norm=False, qkv_bias=True)
        if arch == "llama":
            return cls(**common, qk_norm=False, qkv_bias=False)
        n = common["num_layers"]
        window = get("attention.sliding_window", kind=int)
        pattern = get("attention.sliding_window_pattern")
        if isinstance(pattern, (list, tuple)):  # newer converters: per-layer bools
            layer_types = tuple("sliding" if p else "full" for p in pattern)
        else:  # llama.cpp's default for gemma3: every 6th layer is global
            period = get("attention.sliding_window_pattern", 6, int) or 6
            if period <= 0:
                raise ConfigError(f"GGUF metadata {arch}.attention.sliding_window_pattern must be positive")
            layer_types = tuple("full" if (i + 1) % period == 0 else "sliding" for i in range(n))
        return cls(**common, embed_scale=True, sandwich_norm=True, qk_norm=True,
                   activation="gelu_tanh", query_pre_attn_scalar=float(common["head_dim"]),
                   sliding_window=int(window) if window else None, layer_types=layer_types,
                   rope_local_theta=10000.0,
                   final_logit_softcap=get("final_logit_softcapping", kind=float),
                   attn_logit_softcap=get("attn_logit_softcapping", kind=float))


def _rope_params(cfg: Mapping[str, Any], layer_type: str = "full_attention") -> dict:
    """transformers >= 5 nests rope settings under `rope_parameters` (per layer type for Gemma)."""
    p = cfg.get("rope_parameters") or {}
    if layer_type in p and isinstance(p[layer_type], dict):
        return p[layer_type]
    return p


def _rope_scaling_from_hf(cfg: Mapping[str, Any]) -> RopeScaling | None:
    rs = cfg.get("rope_scaling") or _rope_params(cfg)
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    return RopeScaling(kind=kind, factor=float(rs["factor"]),
                       original_max_position_embeddings=rs.get("original_max_position_embeddings"),
                       beta_fast=float(rs.get("beta_fast") or 32.0),
                       beta_slow=float(rs.get("beta_slow") or 1.0),
                       attention_factor=rs.get("attention_factor"),
                       low_freq_factor=float(rs.get("low_freq_factor") or 1.0),
                       high_freq_factor=float(rs.get("high_freq_factor") or 4.0))


def _qwen3(vocab, d, f, layers, heads, kv, tied, ctx=40960):
    return ModelConfig(arch="qwen3", vocab_size=vocab, hidden_size=d, intermediate_size=f,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
                       tie_word_embeddings=tied, max_position_embeddings=ctx,
                       bos_token_id=None, eos_token_ids=(151645,))


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                        tie_word_embeddings=True, max_position_embeddings=512),
    "qwen3-0.6b": _qwen3(151936, 1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _qwen3(151936, 2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _qwen3(151936, 2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3(151936, 4096, 12288, 36, 32, 8, False),
    "qwen3-14b": _qwen3(151936, 5120, 17408, 40, 40, 8, False),
    "qwen3-32b": _qwen3(151936, 5120, 25600, 64, 64, 8, False),
}
