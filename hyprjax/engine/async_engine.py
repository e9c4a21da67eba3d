"""AsyncEngine: the asyncio front the server uses. One thread owns the LLMEngine and its loop.

HTTP handlers call `generate`, which validates at once (so bad requests fail before any
streaming starts), queues the request through a thread-safe inbox, and returns an async
iterator of `RequestOutput`s fed by the engine thread. Leaving the iterator early (a client
that disconnects, a cancelled task) aborts the request and frees its pages.

The loop never dies silently. A failed step ends only the requests it ran (each stream raises
its `StepFailedError`); an exception while handling an inbox message goes back to that message's
sender; and if the engine cannot recover (or the loop's own bookkeeping breaks) the loop stays
up answering every stream and message with `EngineDeadError`, and `dead_reason` says why (the
server's /health answers 500 with it). A merge strategy's merged adapter is computed on a worker
thread before the request reaches the engine thread, which only registers it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from functools import partial
from typing import AsyncIterator

from ..adapters.registry import LoraRequest
from ..errors import HyprjaxError
from ..sampling import SamplingParams
from .llm_engine import (EngineDeadError, EngineError, LLMEngine, QueueFullError, RequestOutput, StepFailedError,
                         TokenLogprob)

__all__ = ["AsyncEngine", "EngineDeadError", "EngineError", "QueueFullError", "RequestOutput", "StepFailedError",
           "TokenLogprob"]

log = logging.getLogger("hyprjax.engine")


class AsyncEngine:
    """Thread-owned LLMEngine with per-request asyncio streams."""

    def __init__(self, engine: LLMEngine | None, model_name: str, *, tokenizer=None, max_model_len: int = 0):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = tokenizer if engine is None else engine.tokenizer
        self.max_model_len = max_model_len if engine is None else engine.max_model_len
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams and _pending
        self._pending = 0  # queued in the inbox, not yet handed to the engine
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._unloads: list[tuple[str, asyncio.AbstractEventLoop, asyncio.Future]] = []  # engine thread only
        self.error: BaseException | None = None  # what broke the loop's own bookkeeping, if anything did

    @property
    def ready(self) -> bool:
        return self.engine is not None and self._thread is not None and self.dead_reason is None

    @property
    def dead_reason(self) -> str | None:
        """Why the engine serves nothing any more (None while it is loading or healthy)."""
        if self.error is not None:
            return f"the engine loop crashed: {type(self.error).__name__}: {self.error}"
        return None if self.engine is None else self.engine.dead_reason

    def _check_serving(self) -> None:
        reason = self.dead_reason
        if reason is not None:
            raise EngineDeadError(reason)
        if not self.ready:
            raise QueueFullError("the engine is still loading; retry shortly")

    def attach(self, engine: LLMEngine) -> None:
        """Set the engine once it has loaded and compiled (the server answers /health 503 until then)."""
        self.engine, self.tokenizer, self.max_model_len = engine, engine.tokenizer, engine.max_model_len
        self.start()

    def start(self) -> None:
        if self._thread is None and self.engine is not None:
            self._thread = threading.Thread(target=self._loop, name="hyprjax-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def stats(self) -> dict:
        if self.engine is None:
            return dict(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_preemptions_total=0,
                        prefix_cache_hit_rate=0.0)
        s = self.engine.stats()
        s["num_waiting"] += self._pending
        return s

    # ---- adapters --------------------------------------------------------------------------

    def adapters(self) -> dict[str, str]:
        """Adapters requests may name: name -> path (empty when serving none)."""
        lora = None if self.engine is None else self.engine.lora
        return {} if lora is None else lora.names()

    def adapter_info(self, name: str) -> dict:
        """Kind, density, bytes, params and rank of a loaded adapter ({} if it is gone); any thread."""
        lora = None if self.engine is None else self.engine.lora
        try:
            return {} if lora is None else {k: v for k, v in lora.describe(name).items() if k != "path"}
        except KeyError:  # unloaded since the caller listed it
            return {}

    async def load_adapter(self, name: str, path: str) -> None:
        """Read an adapter (off the event loop and the engine thread), then register it between steps."""
        from ..adapters.load import read_adapter

        self._check_serving()
        if self.engine.lora is None:
            raise HyprjaxError("this server has no adapters (start it with --lora or --max-loras)")
        if name in self.engine.lora.all_names():
            raise HyprjaxError(f"an adapter named {name!r} is already loaded; unload it first")
        eng = self.engine
        adapter = await asyncio.to_thread(read_adapter, path, name, eng.cfg, eng.ecfg.max_lora_rank)
        await self._call(lambda: eng.add_adapter(adapter))

    async def unload_adapter(self, name: str) -> None:
        """Unload `name`; returns once no request uses it any more (new ones are refused at once)."""
        if self.engine is not None and self.engine.lora is None:
            raise HyprjaxError("this server has no adapters (start it with --lora or --max-loras)")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def remove():
            if not self.engine.remove_adapter(name):
                self._unloads.append((name, loop, done))  # resolved by the loop when its last user ends
            else:
                loop.call_soon_threadsafe(_resolve, done, None)

        await self._call(remove)
        await done

    async def _call(self, fn):
        """Run fn() on the engine thread between steps; its result or exception comes back here."""
        self._check_serving()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._inbox.put(("call", fn, loop, future))
        self._wake.set()
        return await future

    # ---- requests ------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                 logprobs: int | None = None, lora: LoraRequest | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; iterate the result for its outputs."""
        self._check_serving()
        self.engine.validate(prompt_token_ids, params, logprobs)
        if lora is not None:
            if self.engine.lora is None:
                raise HyprjaxError("this server has no adapters (start it with --lora or --max-loras)")
            self.engine.lora.check(lora)
        rid = request_id or uuid.uuid4().hex
        stream: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._lock:
            waiting = self.engine.scheduler.num_waiting + self._pending
            if waiting >= self.engine.ecfg.max_queue:
                raise QueueFullError(f"{waiting} requests are waiting (max_queue={self.engine.ecfg.max_queue}); "
                                     "retry later")
            if rid in self._streams:
                raise HyprjaxError(f"request_id {rid!r} is already in use")
            self._streams[rid] = (loop, stream)
            self._pending += 1
        msg = ("add", rid, list(prompt_token_ids), params, logprobs, lora)
        if lora is not None and lora.strategy != "weighted_sum":
            # Merging on the engine thread would stall every running stream: merge on a worker,
            # and queue the request once its merged adapter is ready.
            work = loop.run_in_executor(None, self.engine.lora.prepare, lora)
            work.add_done_callback(partial(self._after_merge, msg))
        else:
            self._post(msg + (None,))
        return self._stream(rid, stream)

    def _post(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _after_merge(self, msg: tuple, work: asyncio.Future) -> None:
        """The worker merged (or failed to merge) `msg`'s adapters: queue it, or fail its stream."""
        try:
            prepared = work.result()
        except BaseException as e:  # AdapterError, a parent unloaded meanwhile, a cancelled loop
            with self._lock:
                self._pending -= 1
            self._send(msg[1], e if isinstance(e, Exception) else RuntimeError(f"merging the adapters failed: {e!r}"))
            return
        self._post(msg + (prepared,))

    async def _stream(self, rid: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    # ---- the engine thread ---------------------------------------------------------------

    def _send(self, rid: str, item) -> None:
        with self._lock:
            target = self._streams.get(rid)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # its event loop has closed: nobody is left to read it
                with self._lock:
                    self._streams.pop(rid, None)

    def _inbox_messages(self):
        """The messages queued so far, taken one by one."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        """Handle every queued message; whatever one raises goes back to its sender, never up."""
        for msg in self._inbox_messages():
            try:
                self._handle(msg)
            except Exception as e:
                if not isinstance(e, (HyprjaxError, EngineDeadError)):  # bad input and a dead engine are expected
                    log.exception("handling a %r message failed", msg[0])
                self._answer(msg, e)

    def _handle(self, msg: tuple) -> None:
        dead = self.dead_reason
        if msg[0] == "call":
            _, fn, loop, future = msg
            if dead is not None:
                raise EngineDeadError(dead)
            loop.call_soon_threadsafe(_resolve, future, fn())
        elif msg[0] == "add":
            _, rid, ids, params, logprobs, lora, prepared = msg
            with self._lock:
                self._pending -= 1
                live = rid in self._streams
            if not live:  # the client left before the engine saw the request
                return
            if dead is not None:
                raise EngineDeadError(dead)
            self.engine.add_request(ids, params, request_id=rid, logprobs=logprobs, lora=lora, prepared=prepared)
        else:  # tell a reader still there that it ended, then forget the stream
            rid = msg[1]
            out = None if dead is not None else self.engine.abort(rid)
            if out is not None:
                self._send(rid, out)
            with self._lock:
                self._streams.pop(rid, None)

    def _answer(self, msg: tuple, error: Exception) -> None:
        """Hand `error` to whoever sent `msg`."""
        try:
            if msg[0] == "call":
                msg[2].call_soon_threadsafe(_resolve, msg[3], None, error)
                return
            self._send(msg[1], error)
            if msg[0] == "abort":
                with self._lock:
                    self._streams.pop(msg[1], None)
        except Exception:  # its event loop has closed
            log.warning("could not answer a %r message: its sender is gone", msg[0])

    def _finish_unloads(self) -> None:
        """Answer the unloads whose adapter's last request has ended."""
        if not self._unloads:
            return
        names = self.engine.lora.all_names()
        still = []
        for name, loop, future in self._unloads:
            if name in names:
                still.append((name, loop, future))
            else:
                loop.call_soon_threadsafe(_resolve, future, None)
        self._unloads = still

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepFailedError as e:  # the engine recovered: fail the requests of that step only
            outputs = e.outputs
            for rid in e.request_ids:
                self._send(rid, StepFailedError([rid], e.cause))
        except EngineDeadError:
            self._fail_everything()
            return
        for out in outputs:
            self._send(out.request_id, out)
        self._finish_unloads()

    def _fail_everything(self) -> None:
        """The engine is down: answer every stream and pending unload with why (each once)."""
        dead = EngineDeadError(self.dead_reason)
        log.error("%s", dead)
        unloads, self._unloads = self._unloads, []
        for _, loop, future in unloads:
            try:
                loop.call_soon_threadsafe(_resolve, future, None, dead)
            except RuntimeError:  # its event loop has closed
                pass
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            self._send(rid, EngineDeadError(dead.reason))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_inbox()  # once down, this answers every message with EngineDeadError
                if self.dead_reason is None:
                    self._finish_unloads()
                if self.dead_reason is not None or not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._step()
            except BaseException as e:  # the loop's own bookkeeping broke: nothing vouches for the engine now
                log.exception("engine loop crashed")
                self.error = e
                self._fail_everything()
                if not isinstance(e, Exception):  # SystemExit and the like: stop for real
                    return


def _resolve(future: asyncio.Future, result, error: BaseException | None = None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
