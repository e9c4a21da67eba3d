"""Make a random-weight model of a real shape, as GGUF (llama.cpp loads it) or a HF directory.

    python bench/make_model.py --shape qwen3-0.6b --qtype F16 --out bench/models/qwen3-0.6b-f16.gguf
    python bench/make_model.py --shape qwen3-0.6b --format hf --out bench/models/qwen3-0.6b-hf

No model hub is reachable here, so benchmarks and tests build their weights: embeddings N(0, 0.02),
matrices N(0, 1/fan_in) (~0.02 at real widths), norms ~1 (so logits spread ~0.02*sqrt(D) and
vary with the context instead of echoing the input), and a byte-level BPE
tokenizer with exactly `vocab_size` entries, ChatML specials at Qwen's ids. Each tensor is
generated from (seed, name) on access and written at once, so a 0.6B model is never held whole.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

if not __package__:  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hyprjax.config import PRESETS, ModelConfig  # noqa: E402
from hyprjax.formats.gguf_write import QTYPES, write_gguf  # noqa: E402
from hyprjax.formats.names import tensor_table  # noqa: E402

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class RandomWeights(Mapping):
    """HF name -> float32 array in HF layout, generated on access from (seed, name)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, std: float = 0.02):
        self.cfg, self.seed, self.std = cfg, seed, std
        self.specs = {s.hf: s for s in tensor_table(cfg)}

    def __getitem__(self, name: str) -> np.ndarray:
        s = self.specs[name]
        shape = tuple(reversed(s.shape)) if s.transpose else s.shape
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])  # stable across runs
        # Matrices get std 1/sqrt(fan_in) (~0.02 at real widths): with a flat 0.02 a narrow model's
        # layers add next to nothing to the residual, and tied logits just echo the input token.
        std = self.std if len(shape) == 1 or name == "model.embed_tokens.weight" else shape[1] ** -0.5
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if s.norm and self.cfg.arch != "gemma3":  # Gemma's HF norms are stored minus 1
            x += 1.0
        return x

    def __iter__(self):
        return iter(self.specs)

    def __len__(self):
        return len(self.specs)


def _corpus(seed: int, n_words: int = 60_000) -> list[str]:
    """Seeded pseudo-text, so the trained merges do not depend on files on this machine."""
    rng = np.random.default_rng(seed)
    syl = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    lexicon = ["".join(rng.choice(syl, rng.integers(1, 4))) for _ in range(4000)]
    zipf = 1.0 / np.arange(1, len(lexicon) + 1)
    words = rng.choice(lexicon, n_words, p=zipf / zipf.sum())
    lines = [" ".join(words[i:i + 12]) + rng.choice([".", ",", "!", "?"]) for i in range(0, n_words, 12)]
    return lines + [f"{i} {i * 7}" for i in range(2000)] + list(SPECIALS)


def build_tokenizer(vocab_size: int, eos_id: int | None = None, *, max_merges: int = 4000, seed: int = 0):
    """A byte-level BPE `tokenizers.Tokenizer` (Qwen2 pre-tokenizer) of exactly `vocab_size` ids.

    256 byte tokens + up to `max_merges` trained merges, then never-produced filler tokens; the
    ChatML specials end at `eos_id` (<|im_end|>; default the last id) and any ids after it are
    `<|reserved_k|>` control tokens, like Qwen's layout.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    eos_id = vocab_size - 1 if eos_id is None else eos_id
    first_special = eos_id - len(SPECIALS) + 1
    if first_special < 256 + 1 or eos_id >= vocab_size:
        raise ValueError(f"vocab_size={vocab_size} with eos_id={eos_id} leaves no room for 256 bytes and specials")
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(first_special, 256 + max_merges), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)

    # Fix every id by hand: specials go into the model vocab too, so loading keeps their ids.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), first_special):
        vocab[f"Ġfill{i}"] = i  # digits split apart before BPE, so these are never produced
    added = [(t, first_special + k) for k, t in enumerate(SPECIALS)]
    added += [(f"<|reserved_{k}|>", i) for k, i in enumerate(range(eos_id + 1, vocab_size))]
    vocab.update(dict(added))
    spec["added_tokens"] = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=True) for t, i in added]
    out = Tokenizer.from_str(json.dumps(spec))
    assert out.get_vocab_size() == vocab_size and out.token_to_id("<|im_end|>") == eos_id
    return out


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    """A transformers config.json for `cfg` (Qwen3ForCausalLM / Qwen2ForCausalLM / Gemma3ForCausalLM)."""
    c = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
             rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
             tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
             eos_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None, torch_dtype=dtype)
    if cfg.arch == "qwen3":
        return dict(c, architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
                    attention_bias=cfg.qkv_bias)
    if cfg.arch == "qwen2":
        return dict(c, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu")
    return dict(c, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                sliding_window=cfg.sliding_window, rope_local_base_freq=cfg.rope_local_theta,
                layer_types=[("sliding_attention" if s else "full_attention") for s in cfg.is_sliding],
                final_logit_softcapping=cfg.final_logit_softcap, attn_logit_softcapping=cfg.attn_logit_softcap)


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    u = x.view(np.uint32)  # bfloat16: round to nearest even, as torch does
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, cfg: ModelConfig, tensors: Mapping, dtype: str = "bfloat16",
                      progress: bool = False) -> None:
    """Stream the model's `tensors` into one .safetensors file (header from cfg's shapes first)."""
    from tqdm import tqdm

    st_dtype, size = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}[dtype]
    shapes = {s.hf: (tuple(reversed(s.shape)) if s.transpose else s.shape) for s in tensor_table(cfg)}
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * size
        header[name] = dict(dtype=st_dtype, shape=list(shape), data_offsets=[off, off + n])
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in tqdm(shapes, desc=f"writing {path.name}", unit="tensor", disable=not progress):
            x = np.ascontiguousarray(tensors[name], dtype=np.float32)
            for rows in np.array_split(x, max(1, x.size >> 24)):  # 16M-value chunks bound the temporaries
                f.write(_to_dtype(rows, dtype).tobytes())


def make_model(shape: str, qtype: str = "F16", out: str | Path = "", seed: int = 0, *,
               fmt: str = "gguf", dtype: str = "bfloat16", progress: bool = True) -> Path:
    """Write a random model of preset `shape` to `out` (a .gguf file, or a HF directory if fmt='hf')."""
    if shape not in PRESETS:
        raise ValueError(f"shape {shape!r} is not a preset; choose one of {', '.join(PRESETS)}")
    if fmt not in ("gguf", "hf"):
        raise ValueError(f"fmt {fmt!r}: choose gguf or hf")
    cfg = PRESETS[shape]
    out = Path(out or f"bench/models/{shape}-{qtype.lower() if fmt == 'gguf' else 'hf'}"
               + (".gguf" if fmt == "gguf" else ""))
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    tok = build_tokenizer(cfg.vocab_size, eos, seed=seed)
    if eos is None:  # e.g. the tiny preset: let both engines stop on the tokenizer's <|im_end|>
        cfg = cfg.replace(eos_token_ids=(tok.token_to_id("<|im_end|>"),))
    weights = RandomWeights(cfg, seed)
    if fmt == "gguf":
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(f"{tmp}/tokenizer.json")
            write_gguf(out, cfg, weights, qtype=qtype, tokenizer_json=f"{tmp}/tokenizer.json",
                       chat_template=CHATML, progress=progress)
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, model_max_length=cfg.max_position_embeddings, chat_template=CHATML), indent=2))
    write_safetensors(out / "model.safetensors", cfg, weights, dtype, progress)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-0.6b", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--qtype", default="F16", choices=list(QTYPES), help="GGUF weight type")
    p.add_argument("--format", default="gguf", choices=["gguf", "hf"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                   help="SafeTensors dtype (--format hf)")
    p.add_argument("--out", default="", help="output .gguf file or HF directory")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = make_model(a.shape, a.qtype, a.out, a.seed, fmt=a.format, dtype=a.dtype)
    print(path)


if __name__ == "__main__":
    main()
