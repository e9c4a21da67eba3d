"""Tokenizer parity: hyprjax vs the `tokenizers` library, transformers and sentencepiece.

Every tokenizer here is trained in the test on a small multilingual sample, saved the way a HF repo
or llama.cpp's convert_hf_to_gguf.py would save it, and loaded back by both sides.
"""

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from hyprjax.errors import HyprjaxError
from hyprjax.gguf_vocab import read_gguf_metadata
from hyprjax.tokenizer import Tokenizer
from tests.deps import need

transformers = need("transformers")
spm = need("sentencepiece")

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# English, German, Chinese, Japanese, Russian, Arabic, emoji, code with tabs and space runs, JSON,
# digits, leading/trailing spaces, \r\n, and chat markup with special tokens.
SAMPLE = json.loads((Path(__file__).parent / "data" / "multilingual_sample.json").read_text(encoding="utf-8"))
# Not in the training text: rare characters exercise byte fallback and unseen byte sequences.
PROBES = SAMPLE + ["Ωμέγα ℵ₀ ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "tab\there\t\t\tand  two  spaces", "x" * 40, "", " ", "a\u0308b"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]


def _hf_dir(root: Path) -> Path:
    """A Qwen3-shaped HF tokenizer directory: byte-level BPE trained here on SAMPLE."""
    tok = Backend(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([s for s in SAMPLE[:-1] for _ in range(3)], trainer)
    # As in Qwen3's tokenizer.json: added, matched whole, but not special, so decode keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 32768}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    (root / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    (root / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "vocab_size": tok.get_vocab_size() + 3, "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"]}))
    return root


def _writer(path: Path, arch: str) -> gguf.GGUFWriter:
    """A writer with the hyperparameters transformers needs to build a config from the file."""
    w = gguf.GGUFWriter(str(path), arch)
    for name, value in (("context_length", 2048), ("embedding_length", 64), ("block_count", 1),
                        ("feed_forward_length", 128), ("head_count", 4), ("head_count_kv", 2), ("key_length", 16),
                        ("value_length", 16), ("rope_freq_base", 1e4), ("layer_norm_rms_eps", 1e-6)):
        getattr(w, f"add_{name}")(value)
    return w


def _finish(w: gguf.GGUFWriter) -> None:
    w.add_tensor("token_embd.weight", np.zeros(1, dtype=np.float32))  # a file needs a tensor
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _qwen_gguf(hf_dir: Path, path: Path) -> Path:
    """The vocabulary written as convert_hf_to_gguf.py's `_set_vocab_gpt2` writes Qwen2/Qwen3."""
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    reverse = {i: t for t, i in hf.get_vocab().items()}
    added = hf.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            look_special = tok.startswith("<|") and tok.endswith("|>")
            special = hf.added_tokens_decoder[i].special or look_special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    w = _writer(path, "qwen3")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(w, quiet=True)
    _finish(w)
    return path


def _spm_gguf(root: Path, gemma: bool) -> tuple[Path, "spm.SentencePieceProcessor"]:
    """A sentencepiece BPE model with byte fallback, written as `_set_vocab_sentencepiece` does."""
    (root / "spm").mkdir(parents=True, exist_ok=True)
    prefix = root / "spm" / "tokenizer"  # apart from the GGUF: AutoTokenizer would load a tokenizer.model
    extra = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3} if gemma else {}
    user = ["<start_of_turn>", "<end_of_turn>"] + (["▁▁", "▁▁▁▁"] if gemma else [])
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for s in SAMPLE[:-1] for _ in range(3)]), model_prefix=str(prefix),
        vocab_size=900 if gemma else 880, model_type="bpe", byte_fallback=True, character_coverage=0.98,
        split_digits=True, add_dummy_prefix=not gemma, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", user_defined_symbols=user,
        max_sentencepiece_length=16, minloglevel=2, **extra)
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        ty = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            ty = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            ty = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            ty = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            ty = gguf.TokenType.BYTE
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(ty)
    # tokenizer_config's added_tokens_decoder: turn markers special, whitespace runs not.
    for i, tok in enumerate(tokens):
        if tok in ("<start_of_turn>", "<end_of_turn>"):
            types[i], scores[i] = gguf.TokenType.CONTROL, -1000.0
        elif tok.startswith("▁▁") and gemma:
            types[i], scores[i], tokens[i] = gguf.TokenType.USER_DEFINED, -1000.0, tok.replace("▁", " ")
    (root / "gguf").mkdir(exist_ok=True)
    path = root / "gguf" / "model.gguf"
    w = _writer(path, "gemma3" if gemma else "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if gemma:
        w.add_pad_token_id(sp.pad_id())
        w.add_eot_token_id(tokens.index("<end_of_turn>"))
        w.add_add_space_prefix(False)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    _finish(w)
    return path, sp


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _hf_dir(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def qwen_gguf(hf_dir, tmp_path_factory) -> Path:
    return _qwen_gguf(hf_dir, tmp_path_factory.mktemp("qwen_gguf") / "model.gguf")


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def spm_gguf(request, tmp_path_factory):
    return _spm_gguf(tmp_path_factory.mktemp(request.param), gemma=request.param == "gemma3")


def _ids(hf_tok, text: str, add_special_tokens: bool = True) -> list[int]:
    return hf_tok(text, add_special_tokens=add_special_tokens)["input_ids"]


def test_hf_dir_matches_tokenizers_and_transformers(hf_dir):
    ours = Tokenizer.from_hf_dir(hf_dir)
    lib = Backend.from_file(str(hf_dir / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for text in PROBES:
        ids = ours.encode(text)
        assert ids == lib.encode(text).ids == _ids(ref, text), text
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), text
        assert ours.decode(ids, False) == text.replace("a\u0308", "ä")  # NFC, then a lossless round trip
    assert ours.decode(ours.encode("<think>x</think><|im_end|>")) == "<think>x</think>"
    assert ours.bos_token_id is None and ours.vocab_size == len(ref) == lib.get_vocab_size()
    assert ours.eos_token_ids == {lib.token_to_id("<|im_end|>"), lib.token_to_id("<|endoftext|>")}


@pytest.mark.parametrize("post_processor", ["byte_level", "bos_template", None])
def test_hf_dir_bos_follows_tokenizer_json(hf_dir, tmp_path, post_processor):
    """As in transformers v5, tokenizer.json's post-processor decides BOS, whatever the config says."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    bos_id = next(a["id"] for a in tj["added_tokens"] if a["content"] == "<|endoftext|>")
    if post_processor == "bos_template":
        tj["post_processor"] = json.loads(processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="$A $B", special_tokens=[("<|endoftext|>", bos_id)]).__getstate__())
    elif post_processor is None:
        tj["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    # The config says the opposite of the post-processor (or, without one, asks for BOS).
    config.update(bos_token="<|endoftext|>", add_bos_token=post_processor != "bos_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_hf_dir(tmp_path)
    ids = ours.encode("Hello")
    assert ours.bos_token_id == bos_id and ours.encode("Hello", add_special_tokens=False) == ids[-1:]
    if post_processor is None:  # transformers adds nothing here; we keep the config's explicit wish
        assert ids[0] == bos_id
    else:
        assert ids == _ids(transformers.AutoTokenizer.from_pretrained(str(tmp_path)), "Hello")
        assert (ids[0] == bos_id) == (post_processor == "bos_template")


def test_read_gguf_metadata_matches_gguf_reader(qwen_gguf):
    meta = read_gguf_metadata(qwen_gguf)
    reader = gguf.GGUFReader(str(qwen_gguf))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert meta[key] == field.contents(), key
    assert isinstance(meta["tokenizer.ggml.tokens"][0], str) and isinstance(meta["tokenizer.ggml.token_type"][0], int)
    assert meta["general.architecture"] == "qwen3" and meta["tokenizer.ggml.pre"] == "qwen2"


def test_read_gguf_metadata_is_fast_on_a_large_vocabulary(tmp_path):
    n = 150_000
    w = gguf.GGUFWriter(str(tmp_path / "big.gguf"), "qwen3")
    w.add_token_list([f"tok{i}\u00e9" for i in range(n)])
    w.add_token_types([1] * n)
    w.add_token_scores([-float(i) for i in range(n)])
    w.add_token_merges([f"a{i} b" for i in range(n)])
    _finish(w)
    start = time.perf_counter()
    meta = read_gguf_metadata(tmp_path / "big.gguf")
    assert time.perf_counter() - start < 3.0  # ~0.2 s here; GGUFReader takes several seconds
    assert meta["tokenizer.ggml.tokens"][-1] == f"tok{n - 1}\u00e9" and meta["tokenizer.ggml.scores"][-1] == -(n - 1)
    assert len(meta["tokenizer.ggml.merges"]) == n and meta["tokenizer.ggml.token_type"][:2] == [1, 1]


def test_gguf_byte_level_matches_hf(hf_dir, qwen_gguf):
    ours = Tokenizer.from_gguf_metadata(read_gguf_metadata(qwen_gguf))
    hf = Tokenizer.from_hf_dir(hf_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(qwen_gguf.parent), gguf_file=qwen_gguf.name)
    for text in PROBES:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        if text != "a\u0308b":  # transformers' GGUF path does not NFC-normalize; Qwen's own tokenizer does
            assert ids == _ids(ref, text), text
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.vocab_size == hf.vocab_size + 3  # the converter pads to config.vocab_size with [PAD<i>]
    assert ours.eos_token_ids == hf.eos_token_ids
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)  # Qwen adds no BOS
    assert ours.decode([ours.vocab_size - 1], skip_special_tokens=False) == f"[PAD{ours.vocab_size - 1}]"


def test_gguf_sentencepiece_matches_transformers(spm_gguf):
    path, sp = spm_gguf
    meta = read_gguf_metadata(path)
    ours = Tokenizer.from_gguf_metadata(meta)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gemma = meta["general.architecture"] == "gemma3"
    probes = PROBES + ["<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"]
    for text in probes:
        ids = ours.encode(text)
        assert ids == _ids(ref, text), text
        assert ids[0] == sp.bos_id()
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), text
        # Plain text gets the pieces sentencepiece itself picks, except that HF's Metaspace adds no
        # "▁" before text that already starts with a space (sentencepiece adds one more).
        if not gemma and "<" not in text and not text.startswith(" "):
            assert ids[1:] == sp.encode(text), text
        if gemma or not text.startswith(" "):  # else one leading space is lost, in transformers too
            assert ours.decode(ids[1:], skip_special_tokens=False) == text
    assert ours.bos_token_id == sp.bos_id() and sp.eos_id() in ours.eos_token_ids
    if gemma:
        assert meta["tokenizer.ggml.eot_token_id"] in ours.eos_token_ids


def _check_stream(tok: Tokenizer, add_special_tokens: bool) -> None:
    # A skipped special between two words: a window must not start at it, or a decoder that strips
    # the first leading space (sentencepiece with a space prefix) would eat the next word's space.
    text = "".join(PROBES) + "x<start_of_turn> y<|im_end|> z末尾の絵文字🤖"
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "some character must be split across tokens"
    for skip in (True, False):
        stream = tok.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids, skip)
        assert not any("\ufffd" in p for p in pieces)
    # An id sequence that ends mid-character comes out at flush, as decode shows it.
    stream = tok.stream_decoder()
    cut = next(i for i in range(len(ids)) if tok.decode(ids[:i + 1]).endswith("\ufffd"))
    out = "".join(stream.push(i) for i in ids[:cut + 1])
    assert out + stream.flush() == tok.decode(ids[:cut + 1])


def test_stream_decoder_byte_level(hf_dir, qwen_gguf):
    _check_stream(Tokenizer.from_hf_dir(hf_dir), add_special_tokens=True)
    _check_stream(Tokenizer.from_gguf_file(qwen_gguf), add_special_tokens=True)


def test_stream_decoder_sentencepiece(spm_gguf):
    _check_stream(Tokenizer.from_gguf_file(spm_gguf[0]), add_special_tokens=True)


def test_errors_name_the_file_or_key(tmp_path, qwen_gguf):
    with pytest.raises(HyprjaxError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(HyprjaxError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    meta = read_gguf_metadata(qwen_gguf)
    with pytest.raises(HyprjaxError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.model"})
    with pytest.raises(HyprjaxError, match="tokenizer.ggml.model = 'rwkv'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "rwkv"})
    with pytest.raises(HyprjaxError, match="tokenizer.ggml.pre"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "no-such-pre"})
    # No template in the file, but ChatML turn tokens in the vocabulary: the built-in ChatML applies.
    chat = Tokenizer.from_gguf_metadata(meta).apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tokens = [t.replace("<|im_start|>", "<|x|>") for t in meta["tokenizer.ggml.tokens"]]
    with pytest.raises(HyprjaxError, match="no tokenizer.chat_template.*no chat template"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.tokens": tokens}).apply_chat_template(
            [{"role": "user", "content": "hi"}])
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(HyprjaxError, match="bad.gguf"):
        read_gguf_metadata(tmp_path / "bad.gguf")
