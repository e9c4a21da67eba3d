"""OpenAI response bodies and stream chunks, built from engine outputs.

Shapes follow OpenAI's API reference for chat completions (`chat.completion`,
`chat.completion.chunk`) and legacy completions (`text_completion`); the ids are
`chatcmpl-...` / `cmpl-...`. Stream events are SSE lines `data: {json}` ended by `data: [DONE]`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

TokenText = Callable[[int], str]  # token id -> its text (special tokens shown)
DONE = "data: [DONE]\n\n"
_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens with this value


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class Choice:
    """One choice's answer accumulated from its outputs (non-streaming)."""

    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob, one per output token, when asked for
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, out) -> None:
        self.text.append(out.new_text)
        self.logprobs.extend(out.logprobs or ())
        self.num_prompt_tokens, self.num_output_tokens = out.num_prompt_tokens, out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


def _lp(x: float) -> float:
    return max(float(x), _FLOOR) if not math.isnan(x) else _FLOOR


# ------------------------------------------------------------------------------------------------ chat
def chat_logprobs(entries, token_text: TokenText) -> dict:
    """`{"content": [{token, logprob, bytes, top_logprobs}]}` for TokenLogprob entries."""
    def one(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def chat_response(rid: str, created: int, model: str, choices: list[Choice], want_logprobs: bool,
                  token_text: TokenText, usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                         "logprobs": chat_logprobs(c.logprobs, token_text) if want_logprobs else None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": usage_, "system_fingerprint": None}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, *, logprobs: dict | None = None,
               finish_reason: str | None = None, with_usage: bool = False) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:  # OpenAI sends usage: null on every chunk but the last when include_usage is set
        chunk["usage"] = None
    return chunk


# ----------------------------------------------------------------------------------------- completions
def completion_logprobs(entries, token_text: TokenText, offset: int) -> tuple[dict, int]:
    """Legacy `{tokens, token_logprobs, top_logprobs, text_offset}`; returns it and the next text offset."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(token_text(e.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    top = [{token_text(t): _lp(lp) for t, lp in e.top} for e in entries]
    return {"tokens": tokens, "token_logprobs": [_lp(e.logprob) for e in entries], "top_logprobs": top,
            "text_offset": offsets}, offset


def completion_response(rid: str, created: int, model: str, choices: list[Choice], want_logprobs: bool,
                        token_text: TokenText, usage_: dict) -> dict:
    out = []
    for i, c in enumerate(choices):
        lp = completion_logprobs(c.logprobs, token_text, 0)[0] if want_logprobs else None
        out.append({"index": i, "text": "".join(c.text), "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": out,
            "usage": usage_, "system_fingerprint": None}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, *, logprobs: dict | None = None,
                     finish_reason: str | None = None, with_usage: bool = False) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(obj: str, rid: str, created: int, model: str, usage_: dict) -> dict:
    """The last chunk of a stream with include_usage: no choices, the whole request's usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}
