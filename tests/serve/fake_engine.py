"""A deterministic stand-in for hyprjax.engine.async_engine.AsyncEngine, to test the HTTP layer.

Tokens are UTF-8 bytes (ids 0..255) plus BOS=256 and EOS=257. A request's output is the text
`fake_text(prompt_ids, seed)` (words cycling from a start the prompt and seed pick), one byte per
token, cut by max_tokens or a stop string exactly as `expected()` computes; temperature and the
other sampling knobs are ignored. The fake records every request and counts aborts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hyprjax.adapters.lora import AdapterError
from hyprjax.adapters.registry import AdapterNotFoundError
from hyprjax.errors import PromptTooLongError
from hyprjax.sampling import SamplingParams
from hyprjax.engine.llm_engine import QueueFullError, RequestOutput, TokenLogprob

BOS, EOS = 256, 257
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


class FakeTokenizer:
    """Byte-level tokenizer with a one-line-per-message chat template that records its keywords."""

    vocab_size = 258
    has_chat_template = True
    specials = {BOS: "<s>", EOS: "</s>"}

    def __init__(self):
        self.template_calls: list[dict] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(self.specials[i])
        return "".join(out) + run.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=None, tools=None, **extra):
        self.template_calls.append({"enable_thinking": enable_thinking, "tools": tools, **extra})
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


def fake_text(prompt_ids: list[int], seed: int | None, length: int) -> str:
    """The first `length` characters the fake generates for this prompt and seed."""
    start = (sum(prompt_ids) + (seed or 0)) % len(WORDS)
    words, text = [], ""
    while len(text) < length:
        words.append(WORDS[(start + len(words)) % len(WORDS)])
        text = " ".join(words) + " "
    return text[:length]


def expected(prompt_ids: list[int], params: SamplingParams) -> tuple[str, str, int]:
    """(text, finish_reason, output tokens) of a request run to its end."""
    full = fake_text(prompt_ids, params.seed, params.max_tokens)
    for n in range(1, len(full) + 1):
        cut = _stop_at(full[:n], params.stop)
        if cut is not None:
            return full[:cut], "stop", n
    return full, "length", len(full)


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None
    lora: object = None  # the LoraRequest the server passed


class FakeEngine:
    """The AsyncEngine interface over `fake_text`.

    delay: seconds per token; chunk: tokens per streamed increment; max_running: more requests
    at once than this raise QueueFullError; prompt_limit: longer prompts raise PromptTooLongError
    (the engine's own check, behind the server's); lazy_errors: raise those at the first read
    instead of at the call, as an `async def` generator would; fail_after: raise RuntimeError
    after that many tokens (an engine bug mid-stream).
    """

    def __init__(self, *, model_name="fake-model", max_model_len=256, delay=0.0, chunk=1, max_running=None,
                 prompt_limit=None, lazy_errors=False, fail_after=None, ready=True, tokenizer=None):
        self.model_name, self.max_model_len, self.ready = model_name, max_model_len, ready
        self.dead_reason: str | None = None  # the Engine protocol's: set it to make /health answer 500
        self.tokenizer = tokenizer or FakeTokenizer()
        self.delay, self.chunk, self.max_running = delay, chunk, max_running
        self.prompt_limit, self.lazy_errors, self.fail_after = prompt_limit, lazy_errors, fail_after
        self.calls: list[Call] = []
        self.running: set[str] = set()
        self.finished: list[str] = []
        self.aborted: list[str] = []  # closed early or abort()ed
        self._abort_requested: set[str] = set()
        self._started: set[str] = set()
        self.lora: dict[str, str] = {}  # adapters: name -> path (load_adapter adds, unload_adapter removes)
        self._lora_of: dict[str, object] = {}

    def generate(self, prompt_token_ids, params, *, request_id=None, logprobs=None, lora=None):
        request_id = request_id or f"fake-{len(self.calls)}"
        if lora is not None:
            missing = [a for a in lora.adapters if a not in self.lora]
            if missing:
                raise AdapterNotFoundError(f"adapter {missing[0]!r} is not loaded")
            self._lora_of[request_id] = lora
        if self.lazy_errors:
            return self._checked_stream(list(prompt_token_ids), params, request_id, logprobs)
        self._check(prompt_token_ids, params)
        self.running.add(request_id)  # admitted now, like an engine that enqueues at the call
        return self._stream(list(prompt_token_ids), params, request_id, logprobs)

    def abort(self, request_id: str) -> None:
        """Finish a running request with reason "abort"; a no-op for unknown or finished ones."""
        if request_id not in self.running:
            return
        if request_id in self._started:
            self._abort_requested.add(request_id)
        else:  # admitted at the call, never read: drop it here, as an engine drops a waiting request
            self.running.discard(request_id)
            self.aborted.append(request_id)

    def adapters(self) -> dict[str, str]:
        return dict(self.lora)

    async def load_adapter(self, name: str, path: str) -> None:
        if name in self.lora:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        self.lora[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self.lora:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        del self.lora[name]

    def stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_cache_usage": len(self.running) / 64,
                "num_preemptions_total": 3, "prefix_cache_hit_rate": 0.25}

    def _check(self, prompt_ids, params):
        if self.max_running is not None and len(self.running) >= self.max_running:
            raise QueueFullError(f"the waiting queue is full ({self.max_running} requests)")
        if self.prompt_limit is not None and len(prompt_ids) > self.prompt_limit:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens, over this engine's "
                                     f"limit of {self.prompt_limit}")

    async def _checked_stream(self, prompt_ids, params, request_id, logprobs):
        self._check(prompt_ids, params)
        self.running.add(request_id)
        async for out in self._stream(prompt_ids, params, request_id, logprobs):
            yield out

    async def _stream(self, prompt_ids, params, request_id, logprobs):
        self.calls.append(Call(request_id, prompt_ids, params, logprobs, self._lora_of.pop(request_id, None)))
        self._started.add(request_id)
        full = fake_text(prompt_ids, params.seed, params.max_tokens)
        text, sent, count, done = "", 0, 0, False
        try:
            while not done:
                ids, lps = [], []
                for _ in range(self.chunk):
                    if count == self.fail_after:
                        raise RuntimeError("fake engine failure")
                    ch = full[count]
                    count += 1
                    text += ch
                    ids.append(ord(ch))
                    top = [((ord(ch) + j) % 256, -0.5 - j) for j in range(logprobs or 0)]
                    lps.append(TokenLogprob(ord(ch), -0.5, top))
                    cut = _stop_at(text, params.stop)
                    if cut is not None:
                        text, reason, done = text[:cut], "stop", True
                    elif request_id in self._abort_requested:
                        reason, done = "abort", True
                    elif count == len(full):
                        reason, done = "length", True
                    if done:
                        break
                safe = len(text) if done else len(text) - _held_back(text, params.stop)
                delta, sent = text[sent:safe], max(sent, safe)
                if self.delay:
                    await asyncio.sleep(self.delay * len(ids))
                else:
                    await asyncio.sleep(0)
                if done:
                    self.finished.append(request_id)
                yield RequestOutput(request_id, ids, delta, lps if logprobs is not None else None, done,
                                    reason if done else None, len(prompt_ids), count, 0)
        finally:
            self.running.discard(request_id)
            if not done or request_id in self._abort_requested:
                self.aborted.append(request_id)
