"""Random PEFT LoRA adapters on the tiny transformers models: the references for adapter tests."""

from __future__ import annotations

import copy

import numpy as np

from hyprjax.adapters.lora import MODULES
from tests.deps import need
from tests.paged_steps import paged_logits as _paged_logits

torch = need("torch")
peft = need("peft")


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
    return _paged_logits(lm.model, lm.cfg, prompt, block_q=block_q, tables=tables, mix=mix)
