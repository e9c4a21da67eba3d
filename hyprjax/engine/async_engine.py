"""AsyncEngine: the asyncio front the server uses. One thread owns the LLMEngine and its loop.

HTTP handlers call `generate`, which validates at once (so bad requests fail before any
streaming starts), queues the request through a thread-safe inbox, and returns an async
iterator of `RequestOutput`s fed by the engine thread. Leaving the iterator early (a client
that disconnects, a cancelled task) aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from typing import AsyncIterator

from ..adapters.registry import LoraRequest
from ..errors import HyprjaxError
from ..sampling import SamplingParams
from .llm_engine import LLMEngine, QueueFullError, RequestOutput, TokenLogprob

__all__ = ["AsyncEngine", "QueueFullError", "RequestOutput", "TokenLogprob"]

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
        self.error: BaseException | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self._thread is not None and self.error is None

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

    async def load_adapter(self, name: str, path: str) -> None:
        """Read an adapter (off the event loop and the engine thread), then register it between steps."""
        from ..adapters.load import read_adapter

        if not self.ready:
            raise QueueFullError("the engine is still loading; retry shortly")
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
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {type(self.error).__name__}: {self.error}")
        if not self.ready:
            raise QueueFullError("the engine is still loading; retry shortly")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._inbox.put(("call", fn, loop, future))
        self._wake.set()
        return await future

    # ---- requests ------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                 logprobs: int | None = None, lora: LoraRequest | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; iterate the result for its outputs."""
        if not self.ready:
            raise QueueFullError("the engine is still loading; retry shortly")
        self.engine.validate(prompt_token_ids, params, logprobs)
        if lora is not None:
            if self.engine.lora is None:
                raise HyprjaxError("this server has no adapters (start it with --lora or --max-loras)")
            self.engine.lora.check(lora)
        rid = request_id or uuid.uuid4().hex
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            waiting = self.engine.scheduler.num_waiting + self._pending
            if waiting >= self.engine.ecfg.max_queue:
                raise QueueFullError(f"{waiting} requests are waiting (max_queue={self.engine.ecfg.max_queue}); "
                                     "retry later")
            if rid in self._streams:
                raise HyprjaxError(f"request_id {rid!r} is already in use")
            self._streams[rid] = (asyncio.get_running_loop(), stream)
            self._pending += 1
        self._inbox.put(("add", rid, list(prompt_token_ids), params, logprobs, lora))
        self._wake.set()
        return self._stream(rid, stream)

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
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------

    def _send(self, rid: str, item) -> None:
        with self._lock:
            target = self._streams.get(rid)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _inbox_messages(self):
        """The messages queued so far, taken one by one."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for msg in self._inbox_messages():
            if msg[0] == "call":
                _, fn, loop, future = msg
                try:
                    loop.call_soon_threadsafe(_resolve, future, fn())
                except Exception as e:
                    loop.call_soon_threadsafe(_resolve, future, None, e)
                continue
            if msg[0] == "add":
                _, rid, ids, params, logprobs, lora = msg
                with self._lock:
                    self._pending -= 1
                    live = rid in self._streams
                if not live:  # the client left before the engine saw the request
                    continue
                try:
                    self.engine.add_request(ids, params, request_id=rid, logprobs=logprobs, lora=lora)
                except HyprjaxError as e:
                    self._send(rid, e)
            else:  # tell a reader still there that it ended, then forget the stream
                rid = msg[1]
                out = self.engine.abort(rid)
                if out is not None:
                    self._send(rid, out)
                with self._lock:
                    self._streams.pop(rid, None)

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

    def _fail_all(self, e: BaseException) -> None:
        """A step raised (an engine bug): end every live request with the error, keep serving."""
        log.exception("engine step failed; aborting the requests in flight")
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            self.engine.abort(rid)
            self._send(rid, RuntimeError(f"the engine failed this request: {type(e).__name__}: {e}"))

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                self._finish_unloads()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    self._fail_all(e)
                    continue
                for out in outputs:
                    self._send(out.request_id, out)
                self._finish_unloads()
        except BaseException as e:  # the loop itself broke: fail every stream loudly, keep the reason
            log.exception("engine loop crashed")
            self.error = e
            dead = RuntimeError(f"the engine stopped: {type(e).__name__}: {e}")
            for _, loop, future in self._unloads:  # nobody would ever answer these
                loop.call_soon_threadsafe(_resolve, future, None, dead)
            for msg in self._inbox_messages():
                if msg[0] == "call":
                    msg[2].call_soon_threadsafe(_resolve, msg[3], None, dead)
            with self._lock:
                rids = list(self._streams)
            for rid in rids:
                self._send(rid, RuntimeError(f"the engine stopped: {type(e).__name__}: {e}"))


def _resolve(future: asyncio.Future, result, error: BaseException | None = None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
