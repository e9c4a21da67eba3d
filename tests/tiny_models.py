"""Tiny random models built with transformers, saved as HF directories: the tests' references."""

from __future__ import annotations

import numpy as np

from tests.deps import need

torch = need("torch")
transformers = need("transformers")


def make_hf_model(out_dir, arch: str = "qwen3", seed: int = 0, **overrides):
    """A random transformers model of `arch` (qwen3 | qwen2 | gemma3 | llama), saved as SafeTensors in out_dir."""
    torch.manual_seed(seed)
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "qwen3":
        base.update(head_dim=24, rope_theta=10000.0)
        cfg = transformers.Qwen3Config(**{**base, **overrides})
        model = transformers.Qwen3ForCausalLM(cfg)
    elif arch == "qwen2":
        base.update(rope_theta=10000.0)
        cfg = transformers.Qwen2Config(**{**base, **overrides})
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "llama":
        base.update(rope_theta=10000.0)
        cfg = transformers.LlamaConfig(**{**base, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gemma3":
        base.update(head_dim=32, sliding_window=8, query_pre_attn_scalar=32, rope_theta=10000.0)
        cfg = transformers.Gemma3TextConfig(**{**base, **overrides})
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random, never-zero biases and norm scales so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.eval()
    model.save_pretrained(out_dir)
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """float32 logits [T, V] of transformers on one unpadded prompt."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # run the full n tokens, as our ignore_eos does
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    """float32 log-softmax [T, V] of transformers' logits on one unpadded prompt."""
    logits = hf_logits(model, ids)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
