"""Serving engine settings: one frozen dataclass, validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..adapters.quantized import check_lora_quantization
from ..errors import ConfigError
from .memory import check_kv_memory

ADAPTER_DTYPES = ("auto", "float32", "bfloat16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


def draft_source(speculative) -> str | None:
    """The PATH of `speculative="draft:PATH"` (a draft model, engine/spec_draft.py), else None."""
    if isinstance(speculative, str) and speculative.startswith("draft:"):
        return speculative[len("draft:"):].strip() or None
    return None


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, pages and compiles."""

    max_num_seqs: int = 32  # sequences running at once
    max_num_batched_tokens: int = 256  # tokens per step: decodes plus prefill chunks
    max_prefill_seqs: int = 4  # sequences that may prefill (a chunk each) in one step
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pool size; None -> from kv_cache_memory
    # KV pool budget when num_pages is None: bytes (int), a fraction of the device's free memory
    # (float in (0, 1]), or None = 192 MiB on CPU, 0.9 of free memory on GPU/TPU (engine/memory.py)
    kv_cache_memory: int | float | None = None
    max_model_len: int | None = None  # context limit; None -> the model's own
    block_q: int = 16  # prefill query block (rows per attention work unit)
    attention_backend: str = "auto"  # auto (pallas on GPU/TPU, xla on CPU) | xla | pallas
    max_queue: int = 256  # waiting requests before new ones are refused (HTTP 503)
    enable_prefix_caching: bool = True
    max_logprobs: int = 20  # top_logprobs at most
    max_loras: int = 0  # LoRA slots on the device (0: no adapters; no LoRA code is compiled)
    max_lora_rank: int = 16  # every slot's rank; adapters of lower rank are zero-padded
    # sparse adapters' slot capacity, as PEFT SHiRA's r: r * (din + dout) values per module (the
    # parameter count of a rank-r LoRA); 0: no table for that kind (adapters/registry.py)
    max_sparse_rank: int = 0  # element-sparse (SHiRA)
    max_block_rank: int = 0  # block-sparse
    sparse_block: int = 16  # the block tables' block size (adapters in multiples of it are split)
    # how loaded adapters are kept on the host: none (floats) | int8 (a scale per rank vector) |
    # int4 (a scale per 128 along it); dequantized into the (float) slots (adapters/quantized.py)
    lora_quantization: str = "none"
    # the slot tables' dtype: auto (the model's compute dtype: float32 on CPU, bfloat16 on GPU/TPU)
    # | float32 | bfloat16. bfloat16 halves the bytes a decode step reads per adapter pair
    # (docs/lora.md measures what that buys on CPU and what it costs in precision)
    adapter_dtype: str = "auto"
    # the KV cache's dtype: auto (bfloat16 when the model computes in bfloat16 or its weights are
    # quantized, else float32: engine/paged.py `resolve_kv_dtype`) | float32 | bfloat16 (half the
    # pool's bytes per token: twice the context in the same memory, and on CPU a faster decode)
    kv_cache_dtype: str = "auto"
    # speculative decoding (engine/speculative.py): None (off) | "ngram" (prompt lookup) |
    # "draft:PATH" (a draft model sharing the target's tokenizer, engine/spec_draft.py); K drafts
    # per sequence and step, from n-grams of ngram_min..ngram_max tokens; verify steps run only
    # while the batch's sequences times (K + 1) fit spec_max_rows decode rows (larger batches are
    # compute-bound: there verifying K extra tokens per sequence costs more than it saves)
    speculative: str | None = None
    num_speculative_tokens: int = 7
    ngram_min: int = 2
    ngram_max: int = 4
    spec_max_rows: int = 16

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs", "page_size", "block_q",
                     "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"engine setting {name} must be a positive integer, got {value!r}")
        check_kv_memory(self.kv_cache_memory)
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
            raise ConfigError(f"engine setting num_pages must be an integer >= 2, got {self.num_pages!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"engine setting max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.max_logprobs, int) or not 1 <= self.max_logprobs <= 64:
            raise ConfigError(f"engine setting max_logprobs must be in [1, 64], got {self.max_logprobs!r}")
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_loras" else 1):
                raise ConfigError(f"engine setting {name} must be an integer >= {0 if name == 'max_loras' else 1}, "
                                  f"got {value!r}")
        for name in ("max_sparse_rank", "max_block_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"engine setting {name} must be an integer >= 0, got {value!r}")
        if self.sparse_block not in (16, 32):
            raise ConfigError(f"engine setting sparse_block must be 16 or 32, got {self.sparse_block!r}")
        check_lora_quantization(self.lora_quantization)
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"engine setting adapter_dtype={self.adapter_dtype!r} is not one of "
                              f"{', '.join(ADAPTER_DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"engine setting kv_cache_dtype={self.kv_cache_dtype!r} is not one of "
                              f"{', '.join(KV_CACHE_DTYPES)}")
        if self.attention_backend not in ("auto", "xla", "pallas"):
            raise ConfigError(f"attention_backend {self.attention_backend!r} is not one of auto, xla, pallas")
        if self.speculative not in (None, "ngram") and not draft_source(self.speculative):
            raise ConfigError(f"speculative={self.speculative!r}: expected 'ngram', 'draft:PATH' (a draft model "
                              "sharing the target's tokenizer) or None (off)")
        for name in ("num_speculative_tokens", "ngram_min", "ngram_max", "spec_max_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"engine setting {name} must be a positive integer, got {value!r}")
        if self.ngram_min > self.ngram_max:
            raise ConfigError(f"ngram_min={self.ngram_min} exceeds ngram_max={self.ngram_max}")
        if self.speculative and self.num_speculative_tokens + 1 > self.spec_max_rows:
            raise ConfigError(f"num_speculative_tokens={self.num_speculative_tokens}: a verify group of "
                              f"{self.num_speculative_tokens + 1} rows must fit spec_max_rows={self.spec_max_rows}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                              f"max_num_seqs={self.max_num_seqs} so every running sequence can decode each step")

    def decode_buckets(self) -> list[int]:
        """Decode-token counts a step is padded to: 0, 1, 2, 4, ... max_num_seqs."""
        out, n = [0], 1
        while n < self.max_num_seqs:
            out.append(n)
            n *= 2
        return out + [self.max_num_seqs]

    def spec_buckets(self) -> list[int]:
        """Decode-row counts of verify steps (engine/speculative.py): whole groups of K + 1 rows,
        a power of two of groups, up to spec_max_rows (at least one group), and as many groups as
        fit spec_max_rows. Whole groups because
        on the XLA path each group attends as one block of K + 1 rows (runner.pack)."""
        if not self.speculative:
            return []
        k1, out, g = self.num_speculative_tokens + 1, [], 1
        while not out or g * k1 <= self.spec_max_rows:
            out.append(g * k1)
            g *= 2
        most = self.spec_max_rows // k1 * k1  # as many whole groups as fit (K = 2: 15 rows, not 12)
        return out + [most] if most > out[-1] else out

    def mixed_decode_buckets(self) -> list[int]:
        """Decode-token counts of steps that also prefill: {8, max_num_seqs} (those that fit).

        Pairing every decode bucket with every prefill bucket compiled 34 step programs at the
        defaults; each costs start-up time (~2.5 s for Gemma 3 270M on 2 cores) and ~15 MB of
        resident memory for its compiled kernels (measured; XLA:CPU keeps every kernel mapped).
        A step that prefills already pays for its chunk, so padding its few decode rows to 8
        costs little: decode-only steps keep the fine grid, mixed steps use two decode sizes,
        18 programs in all at the defaults.
        """
        return sorted({min(8, self.max_num_seqs), self.max_num_seqs})

    def step_buckets(self) -> list[tuple[int, int]]:
        """Every (decode tokens, prefill tokens) shape a base-model step is padded to."""
        dec, pf = self.decode_buckets(), self.prefill_buckets()
        return ([(d, 0) for d in dec if d] + [(0, p) for p in pf if p]
                + [(d, p) for d in self.mixed_decode_buckets() for p in pf if p])

    def lora_buckets(self) -> tuple[list[int], list[int]]:
        """(decode, prefill) bucket sizes of steps that carry adapters: a coarser grid.

        XLA:CPU gives each compiled kernel its own memory mappings, and when the layers were
        unrolled a LoRA step (seven pair loops per layer) mapped ~4x the kernels of a base step:
        compiling every base bucket again with LoRA ran past Linux's default vm.max_map_count
        (65530) on a 28-layer model. Layers are scanned (GPU/TPU) or run layer-wise (CPU) now,
        so that limit is gone; the grid stays to bound start-up time with adapters. LoRA steps
        pad to decode sizes {0, 8, max} and prefill sizes {0, smallest, largest}: at most 8
        extra compiles. Padding a small decode batch costs little (decode reads every
        weight whatever the batch); a short prefill chunk pays for the smallest bucket, a
        longer one for the largest.
        """
        dec = [b for b in self.decode_buckets() if b in (0, 8) or b == self.max_num_seqs]
        pf = self.prefill_buckets()
        return dec, sorted({0, pf[1], pf[-1]}) if len(pf) > 1 else pf

    def prefill_buckets(self) -> list[int]:
        """Prefill-token counts (multiples of block_q): 0, then powers of two from 4 blocks up to
        the budget. Short prompts pad to 4 blocks: one bucket fewer per decode bucket to compile
        at start-up, for little waste next to the step's fixed cost of reading every weight."""
        limit = math.ceil((self.max_num_batched_tokens + self.max_prefill_seqs * (self.block_q - 1)) / self.block_q)
        out, n = [0], min(4, limit)
        while n < limit:
            out.append(n * self.block_q)
            n *= 2
        return out + [limit * self.block_q]
