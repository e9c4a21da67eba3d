"""The engine requests behind one HTTP request, read as one stream.

An HTTP request with `n` choices (and, for completions, several prompts) is several engine
requests. `ChoiceStreams.start` enqueues them all and waits for each one's first output, so a
refusal (queue full, prompt too long) becomes an HTTP error before any byte of the answer is
sent. `outputs()` then yields `(choice index, RequestOutput)` in arrival order, and `aclose()`
closes every engine stream and calls `engine.abort` for each request that has not finished (an
async generator closed before its first read never runs its own clean-up, so closing alone
would leave a request that was admitted at the call). Nothing else in serve/ calls the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import anyio

from .engine_api import Engine, RequestOutput, SamplingParams
from .metrics import RequestTimer

logger = logging.getLogger("hyprjax.serve")


class ChoiceStreams:
    """Engine streams of one HTTP request; always `aclose()` it (idempotent, safe while cancelled)."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._streams: list[AsyncIterator[RequestOutput]] = []
        self._ids: list[str] = []
        self._timers: list[RequestTimer] = []
        self._finished: list[bool] = []
        self._firsts: list[RequestOutput] = []
        self._pumps: list[asyncio.Task] = []
        self._closed = False

    @classmethod
    async def start(cls, engine: Engine, jobs: list[tuple[list[int], SamplingParams]], *, request_id: str,
                    logprobs: int | None, timer: Callable[[], RequestTimer], lora=None) -> ChoiceStreams:
        """Enqueue one engine request per (prompt ids, params) and wait for every first output.

        Whatever `generate` raises (at the call or at the first read) propagates after every
        request already enqueued has been closed again.
        """
        self = cls(engine)
        try:
            for i, (ids, params) in enumerate(jobs):
                rid = f"{request_id}-{i}"
                self._streams.append(engine.generate(ids, params, request_id=rid, logprobs=logprobs, lora=lora))
                self._ids.append(rid)
                self._timers.append(timer())
                self._finished.append(False)
            firsts = [asyncio.create_task(self._next(i)) for i in range(len(jobs))]
            try:
                await asyncio.wait(firsts, return_when=asyncio.FIRST_EXCEPTION)
                refused = next((t for t in firsts if t.done() and t.exception() is not None), None)
                if refused is not None:
                    raise refused.exception()
                self._firsts = [t.result() for t in firsts]
            finally:
                for t in firsts:
                    t.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(*firsts, return_exceptions=True)
        except BaseException:
            await self.aclose()
            raise
        return self

    def __len__(self) -> int:
        return len(self._streams)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) until every choice has finished."""
        queue: asyncio.Queue = asyncio.Queue()
        for i, first in enumerate(self._firsts):
            queue.put_nowait((i, first))
            if not first.finished:
                self._pumps.append(asyncio.create_task(self._pump(i, queue)))
        left = len(self._firsts)
        while left:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            left -= item.finished

    async def aclose(self) -> None:
        """Stop reading, close every engine stream and abort the requests that have not finished."""
        if self._closed:
            return
        self._closed = True
        # Shielded: this runs while the response task is being cancelled (client gone), and anyio
        # would otherwise cancel every await here again before the streams are closed.
        with anyio.CancelScope(shield=True):
            for t in self._pumps:
                t.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            for stream, rid, timer, finished in zip(self._streams, self._ids, self._timers, self._finished):
                timer.close()
                try:  # one failing close must not keep the others' pages held
                    close = getattr(stream, "aclose", None)
                    if close is not None:
                        await close()
                    if not finished:
                        self._engine.abort(rid)
                except Exception:
                    logger.exception("closing engine request %s failed", rid)

    async def _next(self, i: int) -> RequestOutput:
        try:
            out = await anext(self._streams[i])
        except StopAsyncIteration:
            raise RuntimeError(f"engine stream {i} ended without a finished output") from None
        self._timers[i].observe(out)
        self._finished[i] = out.finished
        return out

    async def _pump(self, i: int, queue: asyncio.Queue) -> None:
        try:
            while True:
                out = await self._next(i)
                queue.put_nowait((i, out))
                if out.finished:
                    return
        except Exception as e:  # handed to the reader, which raises it in the handler's task
            queue.put_nowait((i, e))
