"""Random PEFT LoRA adapters on the tiny transformers models: the references for adapter tests."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from hyprjax.adapters.lora import MODULES
from hyprjax.kernels.lora import LoraPairs
from hyprjax.model import LoraStep, PagedMeta, init_paged_cache

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def make_peft_adapter(hf_model, out_dir, *, seed: int, r: int = 8, alpha: float = 16, targets=MODULES,
                      rslora: bool = False, rank_pattern=None, alpha_pattern=None, magnitude: float = 0.05):
    """A PeftModel over a copy of `hf_model` with random, nonzero A and B, saved to out_dir."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                             rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                             init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(hf_model), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * magnitude)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def peft_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def paged_logits(lm, prompt: list[int], tables=None, mix=(), block_q: int = 8) -> np.ndarray:
    """Logits [T, V] of our model over one prompt in a single paged prefill step, with the
    adapter mix ((slot, weight), ...) applied from `tables` (the registry's slot table)."""
    import jax
    import jax.numpy as jnp

    n = len(prompt)
    t = -(-n // block_q) * block_q
    pages = -(-t // block_q) + 1
    tokens = np.zeros(t, np.int32)
    tokens[:n] = prompt
    positions = np.full(t, -1, np.int32)
    positions[:n] = np.arange(n)
    slots = np.where(positions >= 0, positions, -1).astype(np.int32)
    meta = PagedMeta(jnp.asarray(slots), jnp.zeros((0,), jnp.int32), jnp.zeros((t // block_q,), jnp.int32),
                     jnp.arange(pages, dtype=jnp.int32)[None], jnp.asarray([n], jnp.int32), block_q=block_q)
    lora = None
    if mix:
        pairs = [(s, k * block_q, w) for s, w in mix for k in range(t // block_q)]
        empty = LoraPairs(jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32),
                          jnp.int32(0))
        pf = LoraPairs(jnp.asarray([p[1] for p in pairs], jnp.int32), jnp.asarray([p[0] for p in pairs], jnp.int32),
                       jnp.asarray([p[2] for p in pairs], jnp.float32), jnp.int32(len(pairs)))
        lora = LoraStep(tables, empty, pf)
    cache = init_paged_cache(lm.cfg, pages, block_q, jnp.float32)
    logits, _ = jax.jit(lambda m, c: m(jnp.asarray(tokens)[None], jnp.asarray(positions)[None], c,
                                         logit_index=jnp.arange(n, dtype=jnp.int32), meta=meta, lora=lora)
                        )(lm.model, cache)
    return np.asarray(logits)
