"""The one table from checkpoint tensor names to model parameter paths.

Both loaders walk `tensor_table(cfg)`: the SafeTensors loader looks tensors up by `hf`, the GGUF
loader by `gguf`, the writer used by tests and `bench/` goes the other way. Linear weights are
stored by HF and GGUF as [out, in]; the model keeps [in, out] (`x @ W`), so `transpose` marks them.
Per-layer tensors name their `layer`: the model stacks each of them on a leading layer axis
(`("layers", "attn", "q_proj", "kernel")` is one [L, D, N*H] array), and layer i fills row i.

Each tensor also names its logical axes (`axes`, maxtext/levanter style): q/k/v/gate/up are
column-parallel (output dim "heads" / "kv_heads" / "mlp"), o/down row-parallel (input dim), the
embedding and LM head vocab-parallel, norms unnamed (replicated). The stacked layer axis is
"layers". Which mesh axis a logical axis lands on is `hyprjax/sharding.py`'s one rules table;
nothing here knows a mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    path: tuple  # parameter path in the model state, e.g. ("layers", "attn", "q_proj", "kernel")
    hf: str  # HF SafeTensors name
    gguf: str  # llama.cpp GGUF name
    shape: tuple[int, ...]  # the tensor's shape in the model (one layer's, for per-layer tensors)
    transpose: bool = False  # checkpoint holds the transpose ([out, in])
    norm: bool = False  # an RMSNorm scale (Gemma's HF checkpoints store it minus 1)
    layer: int | None = None  # the row of the stacked parameter this tensor fills; None: not per layer
    axes: tuple[str | None, ...] = ()  # logical axis of each dim of `shape` (None or (): replicated)

    @property
    def module(self) -> str:
        """The parameter's module name (e.g. "q_proj", "attn_norm")."""
        return self.path[-2]


def tensor_table(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor the model needs, in file order."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kd = cfg.num_heads * h, cfg.num_kv_heads * h
    gemma = cfg.arch == "gemma3"
    specs = [TensorSpec(("embed", "embedding"), "model.embed_tokens.weight", "token_embd.weight",
                        (cfg.vocab_size, d), axes=("vocab", "embed"))]
    for i in range(cfg.num_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."

        def add(path, hf_name, gguf_name, shape, **kw):
            specs.append(TensorSpec(("layers", *path), hf + hf_name, gg + gguf_name, shape, layer=i, **kw))

        add(("attn_norm", "scale"), "input_layernorm.weight", "attn_norm.weight", (d,), norm=True)
        for name, short, out, heads in (("q_proj", "attn_q", qd, "heads"), ("k_proj", "attn_k", kd, "kv_heads"),
                                        ("v_proj", "attn_v", kd, "kv_heads")):
            add(("attn", name, "kernel"), f"self_attn.{name}.weight", f"{short}.weight", (d, out), transpose=True,
                axes=("embed", heads))
            if cfg.qkv_bias:
                add(("attn", name, "bias"), f"self_attn.{name}.bias", f"{short}.bias", (out,), axes=(heads,))
        add(("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "attn_output.weight", (qd, d), transpose=True,
            axes=("heads", "embed"))
        if cfg.qk_norm:
            add(("attn", "q_norm", "scale"), "self_attn.q_norm.weight", "attn_q_norm.weight", (h,), norm=True)
            add(("attn", "k_norm", "scale"), "self_attn.k_norm.weight", "attn_k_norm.weight", (h,), norm=True)
        if gemma:
            add(("post_attn_norm", "scale"), "post_attention_layernorm.weight", "post_attention_norm.weight",
                (d,), norm=True)
            add(("mlp_norm", "scale"), "pre_feedforward_layernorm.weight", "ffn_norm.weight", (d,), norm=True)
            add(("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight", "post_ffw_norm.weight",
                (d,), norm=True)
        else:
            add(("mlp_norm", "scale"), "post_attention_layernorm.weight", "ffn_norm.weight", (d,), norm=True)
        add(("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", "ffn_gate.weight", (d, f), transpose=True,
            axes=("embed", "mlp"))
        add(("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", "ffn_up.weight", (d, f), transpose=True,
            axes=("embed", "mlp"))
        add(("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", "ffn_down.weight", (f, d), transpose=True,
            axes=("mlp", "embed"))
    specs.append(TensorSpec(("norm", "scale"), "model.norm.weight", "output_norm.weight", (d,), norm=True))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec(("lm_head", "kernel"), "lm_head.weight", "output.weight",
                                (d, cfg.vocab_size), transpose=True, axes=("embed", "vocab")))
    return specs


def param_axes(cfg: ModelConfig) -> dict[tuple, tuple[str | None, ...]]:
    """Parameter path -> logical axes of the whole parameter ("layers" first for a stacked one)."""
    out = {}
    for spec in tensor_table(cfg):
        axes = spec.axes or (None,) * len(spec.shape)
        out[spec.path] = ("layers", *axes) if spec.layer is not None else axes
    return out


def lora_axes(cfg: ModelConfig) -> dict[str, tuple[tuple, tuple]]:
    """Module -> logical axes of its adapter slot tables (a [L, S, din, R], b [L, S, R, dout]).

    Each factor follows its base weight: b's dout is sharded like a column-parallel kernel's
    output, a's din like a row-parallel kernel's input; slots and rank are never sharded.
    """
    out = {}
    for path, axes in param_axes(cfg).items():
        if path[-1] == "kernel" and path[0] == "layers":
            _, din, dout = axes
            out[path[-2]] = (("layers", None, din, None), ("layers", None, None, dout))
    return out
