"""Chat templates: hyprjax renders exactly what transformers' apply_chat_template(tokenize=False) does."""

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel

from hyprjax.chat_template import compile_chat_template, render_chat_template
from hyprjax.errors import HyprjaxError
from hyprjax.tokenizer import Tokenizer
from tests.deps import need

transformers = need("transformers")

DATA = Path(__file__).parent / "data"
# Qwen3's template (enable_thinking, <think> handling, tool calls) as published with the models, and
# Gemma 3's (BOS written by the template, the system text folded into the first user turn).
QWEN3 = (DATA / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
GEMMA3 = (Path(__file__).parents[1] / "hyprjax" / "templates" / "gemma.jinja").read_text(encoding="utf-8")

# Helpers and extensions transformers provides: tojson options, loop controls, strftime_now, dict,
# namespace, the {% generation %} tag, and a kwarg passed through.
EXTRAS = """{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}{% if m.role == 'skip' %}{% continue %}{% endif %}
[{{ m.role }}] {{ m | tojson }} {{ m | tojson(indent=2, sort_keys=True) }}
{% endfor %}
{%- set d = dict(a=1, b='<&>') %}{{ d | tojson(separators=(',', ':')) }} {{ strftime_now('%Y') | length }}
{% generation %}{{ custom_flag }}{% endgeneration %}{{ tools | tojson }} {{ eos_token }}"""

SYSTEM = {"role": "system", "content": "Du bist ein hilfreicher Assistent. 你好 😀"}
CONVERSATIONS = {
    "system_user": [SYSTEM, {"role": "user", "content": "Wie spät ist es?"}],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "  Tell me a joke.  "},
        {"role": "assistant", "content": "<think>\nA pun.\n</think>\n\nWhy did the chicken..."},
        {"role": "user", "content": "Another one"},
    ],
    "reasoning_content": [
        SYSTEM,
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Adding two and two.", "tool_calls": None},
    ],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Wetter für einen Ort <abfragen> & mehr",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Köln?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"wind": "5 km/h"}'},
]


def _write_dir(root: Path, template: str | None, *, bos: str | None, eos: str, jinja_file: bool = False) -> Path:
    """A tiny HF tokenizer directory: a word-level vocabulary holding the chat special tokens."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["<unk>", "<bos>", "<eos>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<start_of_turn>",
             "<end_of_turn>", "hello", "world"]
    backend = Backend(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in words[:8]])
    backend.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "unk_token": "<unk>", "pad_token": None}
    if template is not None and jinja_file:
        (root / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(hyprjax, transformers) tokenizers per template, loaded from the same directory."""
    out = {}
    for name, template, bos, eos, jinja_file in (("qwen3", QWEN3, None, "<|im_end|>", False),
                                                  ("gemma3", GEMMA3, "<bos>", "<eos>", True),
                                                  ("extras", EXTRAS, "<bos>", "<eos>", False)):
        root = _write_dir(tmp_path_factory.mktemp(name), template, bos=bos, eos=eos, jinja_file=jinja_file)
        out[name] = (Tokenizer.from_hf_dir(root), transformers.AutoTokenizer.from_pretrained(str(root)), root)
    return out


def _both(pair, name, messages, **kw):
    ours, ref, _ = pair[name]
    ref_kw = {k: v for k, v in kw.items() if v is not None or k == "tools"}
    expected = ref.apply_chat_template(messages, tokenize=False, **ref_kw)
    return ours.apply_chat_template(messages, **kw), expected


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen3_matches_transformers(pair, conversation, add_generation_prompt, enable_thinking):
    messages = CONVERSATIONS[conversation]
    ours, expected = _both(pair, "qwen3", messages, add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking)
    assert ours == expected
    if add_generation_prompt and enable_thinking is False:
        assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_tools_match_transformers(pair):
    ours, expected = _both(pair, "qwen3", TOOL_CHAT, add_generation_prompt=True, tools=TOOLS)
    assert ours == expected
    assert '"Wetter für einen Ort <abfragen> & mehr"' in ours  # tojson keeps non-ASCII and <, &


@pytest.mark.parametrize("conversation", ["system_user", "multi_turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma3_matches_transformers(pair, conversation, add_generation_prompt):
    ours, expected = _both(pair, "gemma3", CONVERSATIONS[conversation], add_generation_prompt=add_generation_prompt)
    assert ours == expected and ours.startswith("<bos><start_of_turn>user\n")
    multimodal = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe. "}]}]
    ours, expected = _both(pair, "gemma3", multimodal, add_generation_prompt=add_generation_prompt)
    assert ours == expected and "<start_of_image>Describe." in ours


def test_helpers_and_extensions_match_transformers(pair):
    messages = [{"role": "user", "content": "a <b> & ü"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": None, "thinking": "hmm"}, {"role": "user", "content": "late"}]
    ours, expected = _both(pair, "extras", messages, add_generation_prompt=False, tools=TOOLS, custom_flag="on")
    assert ours == expected and "on" in ours and "late" not in ours


def test_gguf_template_and_compile_cache(pair):
    _, ref, _ = pair["gemma3"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.merges": [],
            "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "a"], "tokenizer.ggml.token_type": [3, 3, 3, 1],
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.chat_template": GEMMA3}
    tok = Tokenizer.from_gguf_metadata(meta)
    messages = CONVERSATIONS["multi_turn"]
    assert tok.has_chat_template
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    assert compile_chat_template(GEMMA3) is compile_chat_template(GEMMA3)


def test_messages_are_not_mutated():
    messages = [{"role": "user", "content": "hi", "tool_calls": None}]
    snapshot = json.dumps(messages)
    template = "{% set _ = messages[0].update({'content': 'x'}) %}{{ messages[0].content }}"
    with pytest.raises(HyprjaxError):  # the sandbox refuses to mutate; either way the caller's dict is safe
        render_chat_template(template, messages)
    assert json.dumps(messages) == snapshot


def test_errors_name_the_source(pair, tmp_path):
    ours, _, root = pair["gemma3"]
    with pytest.raises(HyprjaxError, match=r"chat_template\.jinja.*roles must alternate"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    qwen, _, qroot = pair["qwen3"]
    with pytest.raises(HyprjaxError, match=r"tokenizer_config\.json.*No user query found"):
        qwen.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(HyprjaxError, match="messages"):
        qwen.apply_chat_template([])
    bare = Tokenizer.from_hf_dir(_write_dir(tmp_path / "bare", None, bos=None, eos="<eos>"))
    assert not bare.has_chat_template
    with pytest.raises(HyprjaxError, match=r"tokenizer_config\.json"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Tokenizer.from_hf_dir(_write_dir(tmp_path / "broken", "{% if %}", bos=None, eos="<eos>"))
    with pytest.raises(HyprjaxError, match=r"tokenizer_config\.json.*does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
