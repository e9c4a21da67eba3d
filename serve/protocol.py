"""OpenAI request bodies -> validated requests; SamplingParams per choice.

Parsing is pure (no tokenizer, no engine): `parse_chat` / `parse_completion` check every known
field's type and raise `APIError` (400, param = the field). Unknown fields are ignored, as vLLM
does, except the few in `_UNSUPPORTED` whose non-default values would change the answer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from hyprjax.adapters.registry import COMBINATIONS, LoraRequest
from hyprjax.errors import HyprjaxError
from hyprjax.sampling import SamplingParams

from .errors import bad_request

MAX_N = 128  # choices per request (OpenAI's own limit)
MAX_PROMPTS = 128  # prompts in one /v1/completions request, and prompts x n sequences at most
MAX_STOP = 16  # stop strings per request (OpenAI takes 4)
MAX_STOP_CHARS = 1000  # characters per stop string
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions; chat fills the context

_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "array": (lambda v: isinstance(v, list), "an array"),
}

# SamplingParams fields read straight from the body (name, kind); max_tokens is resolved per prompt.
_SAMPLING_FIELDS = (("temperature", "number"), ("top_p", "number"), ("top_k", "int"), ("min_p", "number"),
                    ("presence_penalty", "number"), ("frequency_penalty", "number"),
                    ("repetition_penalty", "number"), ("seed", "int"), ("ignore_eos", "bool"), ("speculative", "bool"))

# Fields we do not implement: a value other than these defaults is refused rather than ignored.
_UNSUPPORTED = {"echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
                "response_format": (None, {"type": "text"}), "tool_choice": (None, "none", "auto")}


@dataclass(frozen=True)
class Options:
    """What chat and completion requests share."""

    model: str | None  # None = the first served name
    sampling: SamplingParams  # max_tokens is a placeholder until `params_for` resolves it
    max_tokens: int | None  # None = the endpoint's default
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top logprobs per token for the engine; None = no logprobs
    user: str | None = None
    lora: LoraRequest | None = None  # from lora_adapters & co.; `model` naming an adapter is resolved by the app


@dataclass(frozen=True)
class ChatRequest:
    options: Options
    messages: list[dict]
    add_generation_prompt: bool = True
    tools: list[dict] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs, e.g. enable_thinking


@dataclass(frozen=True)
class CompletionRequest:
    options: Options
    prompts: list[str | list[int]]  # a batch: each prompt gets n choices


def get(body: dict, name: str, kind: str, default: Any = None) -> Any:
    """body[name] checked to be of `kind`; missing or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    ok, want = _KINDS[kind]
    if not ok(value):
        raise bad_request(f"'{name}' must be {want}, got {_show(value)}", param=name)
    return value


def parse_chat(body: dict) -> ChatRequest:
    """Validate a /v1/chat/completions body."""
    if "messages" not in body:
        raise bad_request("'messages' is required", param="messages")
    messages = _messages(body["messages"])
    max_tokens = get(body, "max_completion_tokens", "int", get(body, "max_tokens", "int"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    logprobs_on = get(body, "logprobs", "bool", False)
    top = get(body, "top_logprobs", "int")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS_CHAT:
        raise bad_request(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS_CHAT}], got {top}", param="top_logprobs")
    if top and not logprobs_on:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    tools = get(body, "tools", "array")
    kwargs = dict(get(body, "chat_template_kwargs", "object", {}))
    for reserved in ("messages", "add_generation_prompt", "tools"):
        if reserved in kwargs:
            raise bad_request(f"'chat_template_kwargs' cannot set '{reserved}'; use the top-level field",
                              param="chat_template_kwargs")
    options = _options(body, max_tokens, param, logprobs=(top or 0) if logprobs_on else None)
    return ChatRequest(options, messages, get(body, "add_generation_prompt", "bool", True), tools, kwargs)


def parse_completion(body: dict) -> CompletionRequest:
    """Validate a /v1/completions body."""
    if "prompt" not in body:
        raise bad_request("'prompt' is required", param="prompt")
    logprobs = get(body, "logprobs", "int")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS_COMPLETION:
        raise bad_request(f"'logprobs' must be in [0, {MAX_LOGPROBS_COMPLETION}], got {logprobs}", param="logprobs")
    options = _options(body, get(body, "max_tokens", "int"), "max_tokens", logprobs=logprobs)
    prompts = _prompts(body["prompt"])
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} are allowed per request",
                          param="prompt")
    if len(prompts) * options.n > MAX_PROMPTS:
        raise bad_request(f"{len(prompts)} prompts x n={options.n} = {len(prompts) * options.n} sequences; at most "
                          f"{MAX_PROMPTS} are allowed per request", param="n")
    return CompletionRequest(options, prompts)


def params_for(options: Options, prompt_len: int, max_model_len: int, *, default_max_tokens: int | None,
               choice: int, prompt_param: str) -> SamplingParams:
    """The SamplingParams of choice `choice` for a prompt of `prompt_len` tokens.

    max_tokens defaults to `default_max_tokens`, else to what is left of the context; a request
    that cannot fit is a 400 naming the numbers. With a seed, choice i uses seed + i.
    """
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens, and the {prompt_param} "
                          f"already has {prompt_len} tokens; no room is left to generate.",
                          param=prompt_param, code="context_length_exceeded")
    wanted = options.max_tokens
    if wanted is None:  # a default never fails a request that has room for some tokens
        wanted = room if default_max_tokens is None else min(default_max_tokens, room)
    elif prompt_len + wanted > max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                          f"{prompt_len + wanted} tokens ({prompt_len} in the {prompt_param}, {wanted} in the "
                          f"completion). Please reduce the length of the {prompt_param} or completion.",
                          param=prompt_param, code="context_length_exceeded")
    seed = options.sampling.seed
    try:
        return replace(options.sampling, max_tokens=wanted, seed=None if seed is None else seed + choice)
    except HyprjaxError as e:
        raise bad_request(str(e), param="max_tokens") from None


# ---------------------------------------------------------------------------------------------- helpers
def _options(body: dict, max_tokens: int | None, max_tokens_param: str, logprobs: int | None) -> Options:
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise bad_request(f"'{name}'={_show(body[name])} is not supported by this server", param=name)
    model = get(body, "model", "str")
    n = get(body, "n", "int", 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    stream = get(body, "stream", "bool", False)
    stream_options = get(body, "stream_options", "object")
    if stream_options is not None and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include_usage = (stream_options or {}).get("include_usage", False)
    if include_usage is None:
        include_usage = False
    if not isinstance(include_usage, bool):
        raise bad_request(f"'stream_options.include_usage' must be a boolean, got {_show(include_usage)}",
                          param="stream_options.include_usage")
    kwargs = {}
    for name, kind in _SAMPLING_FIELDS:
        value = get(body, name, kind)
        if value is not None and kind == "number":
            try:
                value = float(value)
            except OverflowError:
                raise bad_request(f"'{name}' is out of range, got {_show(value)}", param=name) from None
        if value is not None:
            kwargs[name] = value
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{max_tokens_param}' must be >= 1, got {max_tokens}", param=max_tokens_param)
    stop = _stop(body.get("stop"))
    stop_ids = get(body, "stop_token_ids", "array", [])
    if not all(_KINDS["int"][0](t) for t in stop_ids):
        raise bad_request("'stop_token_ids' must be an array of integers", param="stop_token_ids")
    try:  # range checks live in SamplingParams; name the field it names
        sampling = SamplingParams(stop=stop, stop_token_ids=tuple(stop_ids), **kwargs)
    except HyprjaxError as e:
        m = re.search(r"sampling parameter (\w+)=", str(e))
        raise bad_request(str(e), param=m.group(1) if m else None) from None
    return Options(model, sampling, max_tokens, n, stream, include_usage, logprobs, get(body, "user", "str"),
                   _lora(body))


def _lora(body: dict) -> LoraRequest | None:
    """lora_adapters (a name or names), lora_weights ({name: w} or [w, ...]), lora_combination_strategy,
    lora_density, lora_seed -> a LoraRequest (None without lora_adapters). Shape errors are 400s here;
    whether the adapters exist is the engine's to say (404)."""
    names = body.get("lora_adapters")
    rest = [k for k in ("lora_weights", "lora_combination_strategy", "lora_density", "lora_seed")
            if body.get(k) is not None]
    if names is None:
        if rest:
            raise bad_request(f"'{rest[0]}' needs 'lora_adapters'", param=rest[0])
        return None
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise bad_request(f"'lora_adapters' must be an adapter name or a non-empty array of names, got {_show(names)}",
                          param="lora_adapters")
    weights = body.get("lora_weights")
    number = _KINDS["number"][0]
    if isinstance(weights, dict):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise bad_request(f"'lora_weights' names {unknown[0]!r}, which is not in 'lora_adapters'",
                              param="lora_weights")
        values = list(weights.values())
    elif isinstance(weights, list):
        if len(weights) != len(names):
            raise bad_request(f"'lora_weights' has {len(weights)} weights for {len(names)} adapters",
                              param="lora_weights")
        values = weights
    elif weights is None:
        values = []
    else:
        raise bad_request(f"'lora_weights' must be an object {{name: weight}} or an array, got {_show(weights)}",
                          param="lora_weights")
    for w in values:
        if not number(w) or not _finite(w):
            raise bad_request(f"'lora_weights' must hold finite numbers, got {_show(w)}", param="lora_weights")
    strategy = get(body, "lora_combination_strategy", "str", "weighted_sum")
    if strategy not in COMBINATIONS:
        raise bad_request(f"'lora_combination_strategy' must be one of {', '.join(COMBINATIONS)}, got {strategy!r}",
                          param="lora_combination_strategy")
    density = get(body, "lora_density", "number")
    if density is not None and not (_finite(density) and 0 < density <= 1):
        raise bad_request(f"'lora_density' must be in (0, 1], got {_show(density)}", param="lora_density")
    seed = get(body, "lora_seed", "int", 0)
    if seed < 0:
        raise bad_request(f"'lora_seed' must be >= 0, got {seed}", param="lora_seed")
    try:
        return LoraRequest.make(names, weights, strategy, None if density is None else float(density), seed)
    except HyprjaxError as e:
        raise bad_request(str(e), param="lora_adapters") from None


def _finite(x) -> bool:
    """A JSON number that is a finite float (a 400-digit integer overflows float: not finite)."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        raise bad_request(f"'stop' must be a string or an array of strings, got {_show(value)}", param="stop")
    if len(value) > MAX_STOP:
        raise bad_request(f"'stop' has {len(value)} strings; at most {MAX_STOP} are allowed", param="stop")
    longest = max((len(s) for s in value), default=0)
    if longest > MAX_STOP_CHARS:
        raise bad_request(f"a 'stop' string has {longest} characters; at most {MAX_STOP_CHARS} are allowed",
                          param="stop")
    return tuple(value)


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad_request(f"'messages' must be a non-empty array, got {_show(value)}", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{where}' must be an object, got {_show(m)}", param=where)
        if not isinstance(m.get("role"), str):
            raise bad_request(f"'{where}.role' must be a string, got {_show(m.get('role'))}", param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only; templates want one string
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad_request(f"'{where}.content[{j}]': only text parts are supported, got {_show(part)}",
                                      param=f"{where}.content")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"'{where}.content' must be a string or an array of parts, got {_show(content)}",
                              param=f"{where}.content")
        out.append({**m, "content": content})
    return out


def _prompts(value: Any) -> list[str | list[int]]:
    is_int = _KINDS["int"][0]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(is_int(t) for t in value):
            return [list(value)]
        if all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in value):
            return [list(p) for p in value]
    raise bad_request("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                      f"arrays of token ids (none empty), got {_show(value)}", param="prompt")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
