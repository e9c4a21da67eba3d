"""The one table from checkpoint tensor names to model parameter paths.

Both loaders walk `tensor_table(cfg)`: the SafeTensors loader looks tensors up by `hf`, the GGUF
loader by `gguf`, the writer used by tests and `bench/` goes the other way. Linear weights are
stored by HF and GGUF as [out, in]; the model keeps [in, out] (`x @ W`), so `transpose` marks them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    path: tuple  # parameter path in the model state, e.g. ("layers", 3, "attn", "q_proj", "kernel")
    hf: str  # HF SafeTensors name
    gguf: str  # llama.cpp GGUF name
    shape: tuple[int, ...]  # the parameter's shape in the model
    transpose: bool = False  # checkpoint holds the transpose ([out, in])
    norm: bool = False  # an RMSNorm scale (Gemma's HF checkpoints store it minus 1)


def tensor_table(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor the model needs, in file order."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kd = cfg.num_heads * h, cfg.num_kv_heads * h
    gemma = cfg.arch == "gemma3"
    specs = [TensorSpec(("embed", "embedding"), "model.embed_tokens.weight", "token_embd.weight",
                        (cfg.vocab_size, d))]
    for i in range(cfg.num_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."

        def add(path, hf_name, gguf_name, shape, **kw):
            specs.append(TensorSpec(("layers", i, *path), hf + hf_name, gg + gguf_name, shape, **kw))

        add(("attn_norm", "scale"), "input_layernorm.weight", "attn_norm.weight", (d,), norm=True)
        for name, short, out in (("q_proj", "attn_q", qd), ("k_proj", "attn_k", kd), ("v_proj", "attn_v", kd)):
            add(("attn", name, "kernel"), f"self_attn.{name}.weight", f"{short}.weight", (d, out), transpose=True)
            if cfg.qkv_bias:
                add(("attn", name, "bias"), f"self_attn.{name}.bias", f"{short}.bias", (out,))
        add(("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", "attn_output.weight", (qd, d), transpose=True)
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
        add(("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", "ffn_gate.weight", (d, f), transpose=True)
        add(("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", "ffn_up.weight", (d, f), transpose=True)
        add(("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", "ffn_down.weight", (f, d), transpose=True)
    specs.append(TensorSpec(("norm", "scale"), "model.norm.weight", "output_norm.weight", (d,), norm=True))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec(("lm_head", "kernel"), "lm_head.weight", "output.weight",
                                (d, cfg.vocab_size), transpose=True))
    return specs
