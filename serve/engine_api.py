"""What the HTTP layer needs from the engine, written down in one place.

The server only ever calls the members of `Engine` below: it enqueues with `generate`, reads its
own request's stream, and closes that stream to abort. Anything with these members can be served
(the tests serve a fake one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from hyprjax.adapters.load import AdapterPathError, check_allowed
from hyprjax.adapters.lora import AdapterError
from hyprjax.adapters.registry import AdapterNotFoundError, LoraRequest
from hyprjax.errors import HyprjaxError, PromptTooLongError
from hyprjax.sampling import SamplingParams

from hyprjax.engine.llm_engine import EngineDeadError, EngineError, QueueFullError, StepFailedError

__all__ = ["AdapterError", "AdapterNotFoundError", "AdapterPathError", "Engine", "EngineDeadError", "EngineError",
           "HyprjaxError", "LoraRequest", "PromptTooLongError", "QueueFullError", "RequestOutput", "SamplingParams",
           "StepFailedError", "check_allowed"]


class TokenLogprob(Protocol):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class RequestOutput(Protocol):
    """One streamed increment of one engine request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # text delta, stop strings already cut
    logprobs: list[TokenLogprob] | None  # one per new token when asked for
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


class Engine(Protocol):
    """The engine as the server sees it (hyprjax.engine.async_engine.AsyncEngine)."""

    model_name: str
    tokenizer: Any  # hyprjax.tokenizer.Tokenizer: encode, decode, apply_chat_template, vocab_size
    max_model_len: int
    ready: bool
    dead_reason: str | None  # why the engine serves nothing any more (/health answers 500 with it), or None


    def generate(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                 logprobs: int | None = None, lora: LoraRequest | None = None) -> AsyncIterator[RequestOutput]:
        """Enqueue one request; may raise PromptTooLongError / QueueFullError / AdapterNotFoundError /
        AdapterError at the call or the first read, and StepFailedError (a step failed; the engine
        recovered) or EngineDeadError (it did not) while streaming. Closing the iterator early
        aborts the request."""
        ...

    def adapters(self) -> dict[str, str]:
        """Adapters requests may name: name -> path."""
        ...

    def adapter_info(self, name: str) -> dict:
        """An adapter's kind, density, bytes, params and rank ({} if it is gone)."""
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Read and register an adapter (AdapterError naming what is wrong)."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Refuse `name` to new requests now; return once its running requests have ended."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict:
        """num_running, num_waiting, kv_cache_usage (0..1), num_preemptions_total, prefix_cache_hit_rate;
        with adapters also lora_adapters_loaded, lora_slots_in_use, lora_evictions_total."""
        ...
