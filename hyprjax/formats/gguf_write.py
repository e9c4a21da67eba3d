"""Write HF-named weights as a GGUF file laid out the way llama.cpp's `convert_hf_to_gguf.py` does.

Used by tests (round trips against `gguf`, transformers and llama.cpp) and by `bench/` to make
random models of real shapes. Tensors are converted and written one at a time, so a lazy
`Mapping` (e.g. one that generates or reads each tensor on access) never has two copies of the
model in memory. Arch metadata covers what llama.cpp reads for qwen3, qwen2 and gemma3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np

from ..config import ModelConfig
from ..rope import llama3_factors
from .load import gguf_permuted, permute_rows
from .names import tensor_table

Q = gguf.GGMLQuantizationType
# qtype name -> (tensor type for 2-D weights, general.file_type)
QTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "F32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
}
ALIGNMENT = 32  # GGUF default; written explicitly so readers need not assume it


def tensor_qtype(gguf_name: str, shape: tuple[int, ...], qtype: str) -> Q:
    """The type llama.cpp's converter stores this tensor as, for a file of type `qtype`."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r} is not supported; choose one of {', '.join(QTYPES)}")
    # The converter keeps 1-D tensors and norms in F32: most ggml ops only take F32 for them.
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    want = QTYPES[qtype][0]
    block = gguf.GGML_QUANT_SIZES[want][0]
    # A row that does not split into whole blocks cannot be quantized: the converter catches
    # the QuantError and stores F16 instead.
    return want if shape[-1] % block == 0 else Q.F16


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, tensors: Mapping[str, Any], *,
               qtype: str = "F32", tokenizer_json: str | os.PathLike | None = None,
               tokenizer_meta: Mapping[str, Any] | None = None, chat_template: str | None = None,
               progress: bool = False, blocks: Mapping[str, tuple[str, np.ndarray]] | None = None) -> None:
    """Write `tensors` (HF names -> arrays in HF layout [out, in]) as a llama.cpp-loadable GGUF.

    2-D weights (token_embd included) are stored as `qtype`; 1-D tensors and norms stay F32.
    Gemma 3 norms get +1, as llama.cpp's converter adds (HF stores them minus 1). The tokenizer
    comes from a byte-level BPE `tokenizer_json`, or ready `tokenizer.*` KVs in `tokenizer_meta`.
    Tensors in `tensors` that the model does not use (e.g. a tied `lm_head.weight`) are ignored.
    `blocks` (GGUF name -> (type name, stored bytes)) writes those tensors' bytes as given: tests
    build K-quant files from random blocks this way (the gguf package has no K-quant quantizer).
    """
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r} is not supported; choose one of {', '.join(QTYPES)}")
    if tokenizer_json is not None and tokenizer_meta is not None:
        raise ValueError("pass tokenizer_json or tokenizer_meta, not both")
    if cfg.arch == "qwen2" and cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        raise NotImplementedError(f"qwen2 with num_heads*head_dim={cfg.num_heads * cfg.head_dim} != hidden_size="
                                  f"{cfg.hidden_size}: llama.cpp's qwen2 graph assumes they are equal")
    specs = tensor_table(cfg)
    missing = [s.hf for s in specs if s.hf not in tensors]
    if missing:
        raise ValueError(f"tensors is missing {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}")

    w = gguf.GGUFWriter(os.fspath(path), cfg.arch)
    w.add_custom_alignment(ALIGNMENT)
    w.add_name(f"hyprjax {cfg.arch}")
    w.add_file_type(int(QTYPES[qtype][1]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_arch_kvs(w, cfg)
    if tokenizer_json is not None:
        tokenizer_meta = tokenizer_kvs_from_json(tokenizer_json, cfg)
        if chat_template is None:
            chat_template = _sibling_chat_template(Path(tokenizer_json))
    for key, value in (tokenizer_meta or {}).items():
        _add_kv(w, key, value)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    # Plan first (types and byte sizes follow from shapes alone), so the header can be written
    # before any tensor is materialized.
    plan = []
    for s in specs:
        shape = tuple(reversed(s.shape)) if s.transpose else tuple(s.shape)  # HF layout
        qt = Q[blocks[s.gguf][0]] if blocks and s.gguf in blocks else tensor_qtype(s.gguf, shape, qtype)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qt)))
        w.add_tensor_info(s.gguf, gguf.quant_shape_to_byte_shape(shape, qt), np.dtype(np.uint8), nbytes, raw_dtype=qt)
        plan.append((s, shape, qt))
    rope_freqs = _rope_freqs(cfg)
    if rope_freqs is not None:
        w.add_tensor_info("rope_freqs.weight", rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    from tqdm import tqdm

    done = False
    try:
        for s, shape, qt in tqdm(plan, desc=f"writing {Path(path).name}", unit="tensor", disable=not progress):
            if blocks and s.gguf in blocks:
                raw = np.asarray(blocks[s.gguf][1], np.uint8).ravel()
                if raw.size != int(np.prod(gguf.quant_shape_to_byte_shape(shape, qt))):
                    raise ValueError(f"blocks[{s.gguf!r}] holds {raw.size} bytes, {qt.name} {shape} needs "
                                     f"{int(np.prod(gguf.quant_shape_to_byte_shape(shape, qt)))}")
                w.write_tensor_data(raw)
                continue
            data = np.asarray(tensors[s.hf], dtype=np.float32)
            if data.shape != shape:
                raise ValueError(f"tensor {s.hf} has shape {data.shape}, config {cfg.arch} needs {shape}")
            if s.norm and cfg.arch == "gemma3":
                data = data + 1.0  # Gemma3RMSNorm scales by (1 + w); llama.cpp expects w + 1 stored
            if gguf_permuted(s, cfg):
                data = permute_rows(data, cfg.head_dim)  # llama.cpp's row order for q and k
            w.write_tensor_data(gguf.quants.quantize(data, qt).view(np.uint8))
            del data  # keep one tensor alive at a time
        if rope_freqs is not None:
            w.write_tensor_data(rope_freqs)
        done = True
    finally:
        w.close()
        if not done:  # never leave a truncated file that looks like a model
            Path(path).unlink(missing_ok=True)


def _rope_freqs(cfg: ModelConfig) -> np.ndarray | None:
    """Llama 3.x scaling as llama.cpp's converter stores it: a `rope_freqs.weight` tensor of one
    divisor per inverse frequency, no `rope.scaling.*` keys."""
    rs = cfg.rope_scaling
    if rs is None or rs.kind not in ("llama3", "factors"):
        return None
    factors = llama3_factors(cfg.head_dim, cfg.rope_theta, rs) if rs.kind == "llama3" else rs.freq_factors
    return np.asarray(factors, np.float32)


def _add_arch_kvs(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """The `{arch}.*` keys llama.cpp reads when loading qwen3 / qwen2 / gemma3 / llama."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    # Always explicit: Qwen3 and Gemma heads are not hidden_size / num_heads wide.
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    rs = cfg.rope_scaling
    if rs is not None and rs.kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if rs.kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs.factor)
        if rs.kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
            w.add_rope_scaling_yarn_beta_fast(rs.beta_fast)
            w.add_rope_scaling_yarn_beta_slow(rs.beta_slow)
            if rs.attention_factor is not None:
                w.add_rope_scaling_yarn_attn_factor(rs.attention_factor)
    if cfg.arch != "gemma3":
        return
    if cfg.final_logit_softcap:
        w.add_final_logit_softcapping(cfg.final_logit_softcap)
    if cfg.attn_logit_softcap:
        raise NotImplementedError("gemma3 with attn_logit_softcap: llama.cpp's gemma3 has no such key")
    if cfg.sliding_window and any(cfg.is_sliding):
        w.add_sliding_window(cfg.sliding_window)
        if cfg.rope_local_theta is not None:
            w.add_rope_freq_base_swa(cfg.rope_local_theta)
        default = tuple((i + 1) % 6 != 0 for i in range(cfg.num_layers))
        if cfg.is_sliding != default:  # llama.cpp assumes every 6th layer global unless told
            w.add_sliding_window_pattern(list(cfg.is_sliding))


def tokenizer_kvs_from_json(tokenizer_json: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
    """GGUF `tokenizer.ggml.*` KVs (model gpt2, pre qwen2) from a byte-level BPE tokenizer.json.

    Like the converter's `_set_vocab_gpt2`: ids missing from the file become `[PAD<i>]` unused
    tokens so the list has exactly `cfg.vocab_size` entries; special added tokens are CONTROL.
    """
    with open(tokenizer_json, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer_json {tokenizer_json}: model type {model.get('type')!r}, need a byte-level BPE")
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for a in tok.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= cfg.vocab_size:
        raise ValueError(f"tokenizer_json {tokenizer_json} has token id {max(by_id)} >= vocab_size {cfg.vocab_size}")
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        t, ty = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(t)
        types.append(int(ty))
    # tokenizers writes merges as "a b" strings (old) or [a, b] pairs (>= 0.20); GGUF wants strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens)}
    kv: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                          "tokenizer.ggml.merges": merges}
    eot = ids.get("<|endoftext|>")
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else eot
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else eot  # Qwen GGUFs carry bos=<|endoftext|>
    for key, value in (("eos", eos), ("bos", bos), ("padding", eot)):
        if value is not None:
            kv[f"tokenizer.ggml.{key}_token_id"] = int(value)
    kv["tokenizer.ggml.add_bos_token"] = cfg.arch == "gemma3"  # Qwen never prepends a BOS
    return kv


def _sibling_chat_template(tokenizer_json: Path) -> str | None:
    """A HF directory keeps the chat template in tokenizer_config.json next to tokenizer.json."""
    cfg_path = tokenizer_json.with_name("tokenizer_config.json")
    if not cfg_path.is_file():
        return None
    template = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
    return template if isinstance(template, str) else None


def _add_kv(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """Add one ready KV, picking its GGUF type from the value (ids as uint32, like the converter)."""
    V = gguf.GGUFValueType
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if key == "general.architecture":
        return  # already written by GGUFWriter from cfg.arch
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int) and value >= 0:
        w.add_uint32(key, value)
    elif isinstance(value, int):
        w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if key == "tokenizer.ggml.token_type":
            w.add_key_value(key, list(value), V.ARRAY, sub_type=V.INT32)
        elif key == "tokenizer.ggml.scores":
            w.add_key_value(key, [float(v) for v in value], V.ARRAY, sub_type=V.FLOAT32)
        else:
            w.add_array(key, list(value))
    else:
        raise TypeError(f"tokenizer_meta[{key!r}] has unsupported type {type(value).__name__}")
