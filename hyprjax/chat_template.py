"""Chat templates rendered with jinja2 exactly as transformers' `apply_chat_template(tokenize=False)`.

Same environment (immutable sandbox, `trim_blocks`, `lstrip_blocks`, loop controls, the
`{% generation %}` tag), same helpers (`raise_exception`, `strftime_now`, a `tojson` that does not
HTML-escape), same variables (messages, tools, documents, add_generation_prompt, the special tokens
and any extra keyword) and the same message clean-up, so a prompt is byte-identical to the one a
model was fine-tuned on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import HyprjaxError

# Names a message's reasoning arrives under; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders
    its body unchanged, and templates that use it must still compile."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot reach Python internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _TemplateDict:
    """`dict(...)` for templates, without the class object (and its attributes) itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def compile_chat_template(text: str, source: str = "chat template") -> jinja2.Template:
    """Compile a template once (cached by its text); a syntax error names `source` and the line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise HyprjaxError(f"{source}: chat template does not compile (line {e.lineno}: {e.message})") from None


def render_chat_template(template: str, messages: list[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                         tools: list[Mapping[str, Any]] | None = None, documents: list[Mapping] | None = None,
                         source: str = "chat template", **variables: Any) -> str:
    """Render `messages` through `template`; `variables` (bos_token, enable_thinking, ...) reach it too.

    A conversation the template rejects (its `raise_exception`, or any other template error)
    raises `HyprjaxError` naming `source` and the template's message.
    """
    compiled = compile_chat_template(template, source)
    if not messages:
        raise HyprjaxError("messages: a chat needs at least one message")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise HyprjaxError(f"messages[{i}]: a message must be a dict, got {type(message).__name__}")
        # Drop None values: APIs send content=None / tool_calls=None, which templates render as "None".
        chat.append(_plain({k: v for k, v in message.items() if v is not None}))
    chat = [_alias_reasoning(m) for m in chat]
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise HyprjaxError(f"tools[{i}]: a tool must be a JSON-schema dict, got {type(tool).__name__}")
    try:
        return compiled.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=add_generation_prompt, **_plain(variables))
    except jinja2.TemplateError as e:
        raise HyprjaxError(f"{source}: the chat template rejected the conversation: {e.message or e}") from None


def _alias_reasoning(message: dict) -> dict:
    # transformers fills `reasoning_content` (and `thinking`) from whichever reasoning name was sent.
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """Rebuild a value from plain JSON types (fresh copies), as transformers does before rendering:
    the template never mutates the caller's data and never sees arbitrary objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars: np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())  # pydantic models, e.g. OpenAI SDK messages
    return f"<{type(value).__name__}>"
