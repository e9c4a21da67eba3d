"""Data-parallel replicas: N independent engines, one per device group, behind one router.

Why not a "data" mesh axis (hyprjax/sharding.py): an engine step is one flattened row of tokens
over one shared page pool, so splitting it would split the pool and the scheduler's pages too.
A replica is a whole engine instead: its own copy of the weights on its own devices (one device,
or a tensor-parallel group of them), its own KV pool, scheduler and adapter slots, and its own
thread. `Replicas` implements the server's `Engine` protocol (serve/engine_api.py) over them:

  * A request goes to the replica with the fewest requests in flight (handed to it by this
    router and not finished), the lowest index on ties; it stays there to the end, and its
    abort goes there too. Prefix caches are per replica: a repeated prompt reuses its pages
    only when it lands on the same replica (no prefix-aware routing yet).
  * Adapters are loaded into and unloaded from every replica, so any replica serves any request.
  * `stats()` sums the counts and averages the fractions; the server's /metrics and /health
    read it as they read one engine's.
  * The router is healthy while every replica is: one dead replica makes /health answer 500
    with its reason (serving on quietly at reduced capacity would hide the failure).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator

from flax import nnx

from ..errors import ConfigError, HyprjaxError
from ..sharding import make_mesh, shard_params, take_devices, tensor_parallel_mesh


def replica_meshes(data_parallel: int, tensor_parallel: int) -> list:
    """One mesh per replica over consecutive groups of `tensor_parallel` devices; `[None]` (no
    mesh at all) for a single one-device engine. A one-device mesh pins a replica to its device."""
    if data_parallel == 1:
        return [tensor_parallel_mesh(tensor_parallel)]
    if not isinstance(data_parallel, int) or data_parallel < 1:
        raise ConfigError(f"--data-parallel {data_parallel!r} must be an integer >= 1")
    devices = take_devices(data_parallel * tensor_parallel,
                           f"--data-parallel {data_parallel} x --tensor-parallel {tensor_parallel}")
    return [make_mesh(tensor_parallel, devices[i * tensor_parallel:(i + 1) * tensor_parallel])
            for i in range(data_parallel)]


def replica_models(model, cfg, meshes: list) -> Iterator:
    """Each replica's model: the loaded weights placed on that replica's mesh (one copy each,
    made as the replica is built, so the first engine compiles while the rest wait)."""
    if meshes == [None]:
        yield model
        return
    graphdef, state = nnx.split(model)
    for mesh in meshes:
        yield nnx.merge(graphdef, shard_params(state, cfg, mesh))


class Replicas:
    def __init__(self, engines: list, model_name: str):
        if not engines:
            raise HyprjaxError("data parallelism needs at least one replica")
        self.engines = engines
        self.model_name = model_name
        self._lock = threading.Lock()
        self._inflight = [0] * len(engines)
        self._where: dict[str, int] = {}  # request id -> replica

    # ---- what the server reads ------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engines[0].tokenizer

    @property
    def max_model_len(self) -> int:
        return min(e.max_model_len for e in self.engines)

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines)

    @property
    def dead_reason(self) -> str | None:
        for i, e in enumerate(self.engines):
            if e.dead_reason is not None:
                return f"replica {i}: {e.dead_reason}"
        return None

    def stats(self) -> dict:
        each = [e.stats() for e in self.engines]
        out = {}
        for key in each[0]:
            values = [s.get(key, 0) for s in each]
            fraction = key in ("kv_cache_usage", "prefix_cache_hit_rate")
            if isinstance(values[0], list):  # a histogram's counts: bucket by bucket
                out[key] = [sum(v) for v in zip(*values)]
            elif isinstance(values[0], str):  # a setting, the same on every replica
                out[key] = values[0]
            else:
                out[key] = sum(values) / len(values) if fraction else sum(values)
        out["replicas"] = len(each)
        return out

    def adapters(self) -> dict[str, str]:
        return self.engines[0].adapters()

    def adapter_info(self, name: str) -> dict:
        return self.engines[0].adapter_info(name)

    async def load_adapter(self, name: str, path: str) -> None:
        done = []
        try:
            for e in self.engines:
                await e.load_adapter(name, path)
                done.append(e)
        except BaseException:
            for e in done:  # all or nothing: no replica keeps an adapter the others refused
                await e.unload_adapter(name)
            raise

    async def unload_adapter(self, name: str) -> None:
        await asyncio.gather(*(e.unload_adapter(name) for e in self.engines))

    # ---- requests --------------------------------------------------------------------------

    def generate(self, prompt_token_ids, params, *, request_id: str | None = None, logprobs: int | None = None,
                 lora=None) -> AsyncIterator:
        rid = request_id or uuid.uuid4().hex
        with self._lock:
            if rid in self._where:
                raise HyprjaxError(f"request_id {rid!r} is already in use")
            i = min(range(len(self.engines)), key=lambda k: (self._inflight[k], k))
            self._inflight[i] += 1
            self._where[rid] = i
        try:
            stream = self.engines[i].generate(prompt_token_ids, params, request_id=rid, logprobs=logprobs, lora=lora)
        except BaseException:
            self._done(rid)
            raise
        return self._follow(rid, stream)

    async def _follow(self, rid: str, stream) -> AsyncIterator:
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()
            self._done(rid)

    def _done(self, rid: str) -> None:
        with self._lock:
            i = self._where.pop(rid, None)
            if i is not None:
                self._inflight[i] -= 1

    def abort(self, request_id: str) -> None:
        with self._lock:
            i = self._where.get(request_id)
        if i is not None:
            self.engines[i].abort(request_id)

    def replica_of(self, request_id: str) -> int | None:
        """Which replica holds a request in flight (tests, logs)."""
        with self._lock:
            return self._where.get(request_id)

    def start(self) -> None:
        for e in self.engines:
            e.start()

    def shutdown(self) -> None:
        for e in self.engines:
            e.shutdown()
