"""The engine's adapters: host copies of every loaded adapter, a device slot table for a few.

Adapters live in their own pytree, never mixed into the base weights:

    tables[module] = (a f[L, S, din, R], b f[L, S, R, dout])

(one pair of arrays per module: 14 step arguments rather than one per layer) with L layers, S = `max_loras` slots and R = `max_lora_rank` (lower ranks zero-padded; the adapter's
scale folded into `b` when its slot is written, so the kernel needs no scale array).

Sparse adapters (sparse.py) have tables of their own, allocated only when their capacity is set:

    sparse_tables["sparse"][module] = (idx i32[L, S, N], val f[L, S, N])         element-sparse
    sparse_tables["block"][module] = (idx i32[L, S, NB], val f[L, S, NB, b, b])   block-sparse

in the layout kernels/sparse.py reads. Capacities follow PEFT's SHiRA parameterization, r * (din
+ dout) values per module, the parameter count of a rank-r LoRA: N = `max_sparse_rank` * (din +
dout) entries, NB = ceil(`max_block_rank` * (din + dout) / b^2) blocks of b = `sparse_block`.
An adapter's slot fills every table its parts need (a low-rank + sparse adapter writes both the
LoRA and a sparse table); `parts(slot)` tells the runner which pair loops a slot takes part in,
so a step pays only for the kinds its adapters have. A slot
holds one adapter, or one merged mix (`ties`, `dare_*`, `linear`), which is a temporary
adapter computed once per distinct mix and cached on the host. With `quantization` int8 or int4
the host copies of added adapters are kept quantized (quantized.py) and dequantized as a slot is
written or a mix merged; merged mixes stay float.

Lifetime: a request *holds* what it resolved to from `add_request` until it ends, waiting in
the queue included, so unloading an adapter a request holds hides it from new requests at once
and drops it when its last holder ends. A request *pins* its mix in slots from admission until
it ends, so a slot never changes under a running sequence. Unpinned residents form an LRU; a
request whose adapters are not resident takes free slots first, then evicts the least recently
used unpinned ones, and waits at the head of the queue when every slot is pinned (requests
behind it wait too: admission is first come, first served).

Owned by the engine thread. The server's thread calls only `names()`, `all_names()`, `check()`
and `in`, which read (copies of) dicts, atomic under the GIL, and `prepare()`, which computes a
merged mix on a worker thread (a merge takes long enough to stall every running stream if the
engine thread ran it): it snapshots the adapters under `_lock`, which every change to the names
(`_adapters`, `_ids`, `_merged`, `_unloading`) holds, and merges outside it; the engine thread
then only registers the result in `resolve(req, prepared)`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..kernels.lora import bf16_bits
from .lora import MODULES, AdapterError, LoraAdapter, module_shapes
from .quantized import check_lora_quantization, quantize_adapter

log = logging.getLogger("hyprjax.lora")

# weighted_sum and sequential add each adapter's delta per token; the others merge into one adapter.
# sequential applies the adapters in the listed order, each with its weight. Every kind served
# here (LoRA, element- and block-sparse, low-rank + sparse) is an additive delta of the base
# weights, W + w1 * d1 + w2 * d2 + ..., so the order cannot change the result: sequential equals
# weighted_sum exactly (tested), and shares its prefix cache.
COMBINATIONS = ("weighted_sum", "sequential", "linear", "ties", "dare_linear", "dare_ties")
PER_TOKEN = ("weighted_sum", "sequential")
PARTS = ("lora", "sparse", "block")


class AdapterNotFoundError(AdapterError):
    """A request or unload names an adapter that is not loaded (HTTP 404)."""


@dataclass(frozen=True)
class LoraRequest:
    """A request's adapters: names, a weight each, and how to combine them."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "weighted_sum"
    density: float | None = None  # ties / dare_*: fraction of entries kept
    seed: int = 0  # dare_*: the pruning masks' seed

    @classmethod
    def make(cls, adapters, weights=None, strategy: str = "weighted_sum", density: float | None = None,
             seed: int = 0) -> LoraRequest:
        """From API-style arguments: `weights` None (1.0 each), a list, or a {name: weight} dict."""
        if isinstance(adapters, str):
            adapters = [adapters]
        adapters = tuple(adapters)
        if isinstance(weights, dict):
            extra = sorted(set(weights) - set(adapters))
            if extra:
                raise AdapterError(f"lora_weights names {extra}, which are not in lora_adapters {list(adapters)}")
            weights = tuple(float(weights.get(a, 1.0)) for a in adapters)
        elif weights is None:
            weights = (1.0,) * len(adapters)
        else:
            weights = tuple(float(w) for w in weights)
        return cls(adapters, weights, strategy, density, seed)


def _set_slot(tables, slot, values):
    return jax.tree.map(lambda t, v: t.at[:, slot].set(v), tables, values)


@dataclass(frozen=True)
class ResolvedMix:
    """What a request applies and what it holds, as `LoraRegistry.resolve` decided."""

    mix: tuple[tuple[str, float], ...]  # (adapter or merged-mix name, weight) the step adds
    held: tuple[str, ...]  # names it keeps from unloading until it ends (a merged mix's parents too)
    salt: bytes  # the prefix-cache root: K/V computed under this mix only


@dataclass(frozen=True)
class PreparedMerge:
    """A merged mix `LoraRegistry.prepare` computed off the engine thread, for `resolve` to register.

    `key` names the mix and its parents' load generations, so `resolve` uses `adapter` only if
    no parent was reloaded in between.
    """

    key: str
    adapter: LoraAdapter


class LoraRegistry:
    """Named adapters, the device slot table, and which request holds which adapter and slot.

    Two counts per name: `_refs`, requests that resolved to it (from `resolve` until `release`;
    an unload waits for them, and a held merged mix is never trimmed), and `_pins`, requests
    admitted with it in a slot (from `acquire` until `release`; a pinned slot is never evicted).
    """

    def __init__(self, cfg: ModelConfig, *, max_loras: int, max_rank: int, dtype, max_merged: int | None = None,
                 sharding=None, quantization: str = "none", max_sparse_rank: int = 0, max_block_rank: int = 0,
                 sparse_block: int = 16, bits16: bool = False):
        if max_loras < 1:
            raise AdapterError(f"max_loras={max_loras} must be >= 1 to serve adapters")
        self.cfg, self.max_loras, self.max_rank, self.dtype = cfg, max_loras, max_rank, dtype
        # bits16: bfloat16 values kept as their uint16 bits, for the XLA path (kernels/lora.py says why)
        self._bits16 = bits16 and jnp.dtype(dtype) == jnp.bfloat16
        self._table_dtype = jnp.uint16 if self._bits16 else dtype
        self.quantization = check_lora_quantization(quantization)  # how added adapters are kept on the host
        self.max_merged = max_merged or 2 * max_loras
        self._shapes = module_shapes(cfg)
        # sharding: module -> (a, b) NamedShardings under tensor parallelism (hyprjax.sharding.
        # lora_table_sharding), or None; slot writes keep the tables placed so (out_shardings).
        self._table_shardings = None if sharding is None else {m: sharding(m) for m in self._shapes}
        self.sparse_block = sparse_block
        self.capacity = {}  # part -> module -> entries (element) or blocks per slot and layer
        if max_sparse_rank:
            self.capacity["sparse"] = {m: max_sparse_rank * (din + dout) for m, (din, dout) in self._shapes.items()}
        if max_block_rank:
            self.capacity["block"] = {m: -(-max_block_rank * (din + dout) // sparse_block ** 2)
                                      for m, (din, dout) in self._shapes.items() if not (din % sparse_block
                                                                                         or dout % sparse_block)}
        self._sparse_placement = None  # replicated over the tensor-parallel mesh, if any
        if self._table_shardings:
            from jax.sharding import NamedSharding, PartitionSpec

            self._sparse_placement = NamedSharding(next(iter(self._table_shardings.values()))[0].mesh,
                                                   PartitionSpec())
        self.tables = self._zero_tables()
        self.sparse_tables = self._zero_sparse_tables()
        self._slot_parts: list[frozenset] = [frozenset()] * max_loras
        self._set = jax.jit(_set_slot, donate_argnums=0, **({} if sharding is None else
                                                           dict(out_shardings=self._table_shardings)))
        self._set_sparse = jax.jit(_set_slot, donate_argnums=0)
        # compile every table's slot writer now, not while serving (zeros: slot 0 stays empty)
        self._write_slot(0, LoraAdapter("", "", {}), parts={"lora", *self.capacity})
        self._adapters: dict[str, LoraAdapter] = {}  # loaded by users
        self._merged: OrderedDict[str, LoraAdapter] = OrderedDict()  # mixes, least recently used first
        self._ids: dict[str, int] = {}  # name -> load generation (reloading a name never reuses K/V)
        self._gen = itertools.count(1)
        self._slot_of: dict[str, int] = {}
        self._slot_name: list[str | None] = [None] * max_loras
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident and unpinned, oldest first
        self._refs: Counter = Counter()
        self._pins: Counter = Counter()
        self._unloading: set[str] = set()
        self._lock = threading.RLock()  # held by every change to the names prepare() reads
        self._preparing: dict[str, Future] = {}  # merge key -> its merge in progress (guarded by _lock)
        self.evictions = 0
        self.merged_into: str | None = None  # merged mode: the adapter added into the base weights
        self._merge_record = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in jax.tree.leaves((self.tables, self.sparse_tables)))

    def parts(self, slot: int) -> frozenset:
        """The tables slot `slot` has values in: "lora", "sparse", "block" (kernels to run for it)."""
        return self._slot_parts[slot]

    def describe(self, name: str) -> dict:
        """An adapter's kind, density, bytes (as kept on the host), trained values and rank, for /v1/models."""
        a = self._adapters[name]
        return {"kind": a.kind, "density": round(a.density(self.cfg), 6), "bytes": a.nbytes, "params": a.params,
                "rank": a.rank, "path": a.path}

    def _check_capacity(self, adapter: LoraAdapter) -> None:
        """AdapterError naming the first sparse module that has no table or does not fit its capacity."""
        setting = {"sparse": "max_sparse_rank (--max-sparse-rank)", "block": "max_block_rank (--max-block-rank)"}
        for (layer, module), m in adapter.sparse.items():
            part = m.kind
            where = f"adapter {adapter.name!r}: layer {layer} {module}"
            if part not in self.capacity:
                raise AdapterError(f"{where} is {'element' if part == 'sparse' else 'block'}-sparse, and this "
                                   f"engine has no table for it: start it with {setting[part]} >= 1")
            cap = self.capacity[part].get(module)
            if cap is None:
                raise AdapterError(f"{where}: block size {self.sparse_block} does not divide the weight")
            if part == "block":
                if m.block % self.sparse_block:
                    raise AdapterError(f"{where}: blocks of {m.block} are not multiples of the engine's "
                                       f"{self.sparse_block}")
                need = m.nblocks * (m.block // self.sparse_block) ** 2
            else:
                need = m.nnz
            if need > cap:
                din, dout = self._shapes[module]
                unit = "blocks" if part == "block" else "entries"
                r = need * (self.sparse_block ** 2 if part == "block" else 1) / (din + dout)
                raise AdapterError(f"{where} has {need} {unit}, more than the slot's {cap} ({setting[part]} is "
                                   f"too small: this module needs {math.ceil(r)})")

    # ---- adapters by name -----------------------------------------------------------------

    def add(self, adapter: LoraAdapter) -> None:
        if adapter.name in self._unloading:
            raise AdapterError(f"adapter {adapter.name!r} is being unloaded; load it again once its "
                               f"running requests have finished")
        if adapter.name in self._adapters:
            raise AdapterError(f"an adapter named {adapter.name!r} is already loaded; unload it first")
        adapter.check_fits(self.cfg, self.max_rank)
        self._check_capacity(adapter)
        stored = quantize_adapter(adapter, self.quantization)  # a copy: the caller's adapter stays float
        with self._lock:
            self._adapters[adapter.name] = stored
            self._ids[adapter.name] = next(self._gen)
        kept = ""
        if stored is not adapter:
            kept = (f"; kept as {self.quantization}: {stored.nbytes / 2**20:.2f} MiB, "
                    f"{(adapter.nbytes - stored.nbytes) / 2**20:.2f} MiB saved")
        log.info("adapter %r loaded from %s (%s, rank %d, density %.4f, %s%s)", adapter.name, adapter.path,
                 adapter.kind, adapter.rank, adapter.density(self.cfg), ", ".join(adapter.target_modules), kept)

    def names(self) -> dict[str, str]:
        """Adapters new requests may use: name -> path. Read from the server's thread too (a copy)."""
        return {n: a.path for n, a in list(self._adapters.items()) if n not in self._unloading}

    def all_names(self) -> set[str]:
        """Every user adapter still held, those waiting to unload included."""
        return set(self._adapters)

    def __contains__(self, name: str) -> bool:
        return name in self._adapters and name not in self._unloading

    def remove(self, name: str) -> bool:
        """Unload `name`: at once if no request holds it (True), else when the last one ends (False)."""
        if name not in self._adapters:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        if name == self.merged_into:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge it before unloading it")
        with self._lock:
            self._unloading.add(name)
        for key in [k for k, a in self._merged.items() if name in a.parents]:
            self._drop_if_free(key)
        return self._drop_if_free(name)

    def _doomed(self, name: str) -> bool:
        """Unloading, or a merged mix of an adapter that is."""
        mixed = self._merged.get(name)
        return name in self._unloading or (mixed is not None and bool(set(mixed.parents) & self._unloading))

    def _drop_if_free(self, name: str) -> bool:
        if self._refs[name]:
            return False
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._slot_name[slot] = None
            self._lru.pop(name, None)
        with self._lock:
            self._ids.pop(name, None)
            if name in self._merged:
                del self._merged[name]
            elif name in self._adapters:
                del self._adapters[name]
                self._unloading.discard(name)
                log.info("adapter %r unloaded", name)
        return True

    # ---- requests ---------------------------------------------------------------------------

    def check(self, req: LoraRequest) -> None:
        """Raise AdapterNotFoundError / AdapterError naming what is wrong with a request's mix.

        Pure reads, so the server's thread may call it for an early answer; `resolve` repeats it.
        """
        if not req.adapters:
            raise AdapterError("lora_adapters is empty: name at least one adapter")
        if req.strategy not in COMBINATIONS:
            raise AdapterError(f"lora_combination_strategy {req.strategy!r} is not one of {', '.join(COMBINATIONS)}")
        if len(set(req.adapters)) != len(req.adapters):
            raise AdapterError(f"lora_adapters {list(req.adapters)} names an adapter twice")
        if len(req.weights) != len(req.adapters):
            raise AdapterError(f"{len(req.weights)} lora weights for {len(req.adapters)} adapters")
        if len(req.adapters) > self.max_loras and req.strategy in PER_TOKEN:  # a merge takes one slot
            raise AdapterError(f"a {req.strategy} of {len(req.adapters)} adapters exceeds --max-loras "
                               f"{self.max_loras} (one slot each); use fewer, or a merge strategy")
        for name, w in zip(req.adapters, req.weights):
            if name not in self:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded (loaded: {sorted(self.names()) or 'none'})")
            if not math.isfinite(w):
                raise AdapterError(f"lora weight {w} for adapter {name!r} is not finite")
        pruning = req.strategy in ("ties", "dare_linear", "dare_ties")
        if pruning and req.density is None:
            raise AdapterError(f"lora_combination_strategy {req.strategy!r} needs lora_density in (0, 1]")
        if not pruning and req.density is not None:
            raise AdapterError(f"lora_density applies to ties, dare_linear and dare_ties, not {req.strategy!r}")
        if pruning and not (math.isfinite(req.density) and 0 < req.density <= 1):
            raise AdapterError(f"lora_density {req.density} must be in (0, 1]")
        if not isinstance(req.seed, int) or isinstance(req.seed, bool) or not 0 <= req.seed < 2**63:
            raise AdapterError(f"lora_seed {req.seed!r} must be an integer >= 0")

    def resolve(self, req: LoraRequest, prepared: PreparedMerge | None = None) -> ResolvedMix:
        """Check a request's mix, take a hold on what it uses, and say what the step applies.

        `weighted_sum` applies the adapters themselves; merge strategies apply one merged adapter
        (found in the cache, else `prepared`, else computed now: give `prepare(req)`'s result to
        keep the merge off the engine thread) with weight 1, and also hold its parents, so an
        unload of a parent waits for the request too. Every resolve needs a `release`.
        """
        self.check(req)
        if req.strategy in PER_TOKEN:
            mix = tuple(zip(req.adapters, req.weights))
            held = req.adapters
        else:
            key = self._merge(req, prepared)
            mix, held = ((key, 1.0),), (key, *req.adapters)
        for name in held:
            self._refs[name] += 1
        salt = hashlib.blake2b(repr([(n, self._ids[n], w) for n, w in mix]).encode(), digest_size=16).digest()
        return ResolvedMix(self._past_merged(mix), held, salt)

    # ---- merged mode ------------------------------------------------------------------------

    def _past_merged(self, mix: tuple) -> tuple:
        """The mix to add per token over weights that hold `merged_into`: its own weight less 1.

        A request of the merged adapter alone adds nothing (the base step); any other request
        adds the merged adapter with weight -1 besides its own, so every request sees exactly
        the weights it asked for (up to float rounding: W + d - d, computed per token). Its
        prefix-cache salt stays that of the mix it asked for."""
        m = self.merged_into
        if m is None:
            return mix
        weights = dict(mix)
        weights[m] = weights.get(m, 0.0) - 1.0
        return tuple((n, w) for n, w in weights.items() if w != 0.0)

    def resolve_base(self) -> ResolvedMix | None:
        """What a request of the base model applies: nothing, or -1 x the merged adapter."""
        return None if self.merged_into is None else ResolvedMix(self._past_merged(()), (), b"")

    def merge(self, name: str, sites: dict) -> None:
        """Add adapter `name` into the kernels `sites` reaches (merged.py) and serve it from there.

        The caller makes sure no request runs (their mixes were resolved for the old weights).
        The adapter stays held while merged: it cannot be unloaded until `unmerge`."""
        from .merged import merge_into

        if self.merged_into is not None:
            raise AdapterError(f"adapter {self.merged_into!r} is merged already; unmerge it first")
        if name not in self:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded (loaded: {sorted(self.names()) or 'none'})")
        self._merge_record = merge_into(sites, self._adapters[name])
        self._refs[name] += 1
        self.merged_into = name
        log.info("adapter %r merged into the base weights", name)

    def unmerge(self, sites: dict) -> str | None:
        """Restore the kernels exactly as they were before `merge`; returns the adapter's name."""
        from .merged import unmerge

        name = self.merged_into
        if name is None:
            return None
        unmerge(sites, self._merge_record)
        self.merged_into, self._merge_record = None, None
        self._refs[name] -= 1
        if not self._refs[name]:
            del self._refs[name]
        log.info("adapter %r unmerged: base weights restored", name)
        return name

    def prepare(self, req: LoraRequest) -> PreparedMerge | None:
        """Compute the merged adapter a merge-strategy request needs, on the calling thread.

        Safe on any thread (see the module docstring); None for `weighted_sum`, which merges
        nothing. Concurrent prepares of one mix compute it once. Raises as `check` does, or
        AdapterError when the adapters cannot be merged.
        """
        self.check(req)
        if req.strategy in PER_TOKEN:
            return None
        with self._lock:
            gone = [n for n in req.adapters if n not in self]
            if gone:  # unloaded since the check
                raise AdapterNotFoundError(f"adapter {gone[0]!r} is not loaded")
            key = self._merge_key(req)
            cached = self._merged.get(key)
            if cached is not None:
                return PreparedMerge(key, cached)
            parents = [self._adapters[n] for n in req.adapters]
            work = self._preparing.get(key)
            mine = work is None
            if mine:
                work = self._preparing[key] = Future()
        if mine:
            try:
                work.set_result(self._compute_merge(req, key, parents))
            except BaseException as e:  # handed to every waiter, and raised below
                work.set_exception(e)
            finally:
                with self._lock:
                    del self._preparing[key]
        return PreparedMerge(key, work.result())

    def _merge_key(self, req: LoraRequest) -> str:
        parts = ",".join(f"{n}#{self._ids[n]}*{w!r}" for n, w in zip(req.adapters, req.weights))
        return f"{req.strategy}({parts};density={req.density!r};seed={req.seed})"

    def _compute_merge(self, req: LoraRequest, key: str, parents: list[LoraAdapter]) -> LoraAdapter:
        from .merge import merge_adapters

        merged = merge_adapters(parents, list(req.weights), req.strategy, density=req.density, seed=req.seed,
                                name=key)
        merged.parents = tuple(req.adapters)
        merged.check_fits(self.cfg, self.max_rank)
        self._check_capacity(merged)  # a union of supports may outgrow a slot
        return merged

    def _merge(self, req: LoraRequest, prepared: PreparedMerge | None) -> str:
        key = self._merge_key(req)
        if key in self._merged:
            with self._lock:
                self._merged.move_to_end(key)
            return key
        if prepared is not None and prepared.key == key:
            merged = prepared.adapter
        else:  # a synchronous caller (LLM.generate), or a parent was reloaded since prepare()
            merged = self._compute_merge(req, key, [self._adapters[n] for n in req.adapters])
        with self._lock:
            for old in [k for k in self._merged if not self._refs[k]][:max(0, len(self._merged) + 1 - self.max_merged)]:
                self._drop_if_free(old)  # trim the cache: oldest first, never one a request holds
            self._merged[key] = merged
            self._ids[key] = next(self._gen)
        return key

    def acquire(self, names) -> bool:
        """Pin `names` in slots, writing those not resident; False (nothing pinned) if slots are short."""
        names = list(dict.fromkeys(names))
        missing = [n for n in names if n not in self._slot_of]
        free = [s for s, n in enumerate(self._slot_name) if n is None]
        evictable = [n for n in self._lru if n not in names]
        if len(missing) > len(free) + len(evictable):
            return False
        for name in missing:
            if free:
                slot = free.pop(0)
            else:
                victim = evictable.pop(0)
                slot = self._slot_of.pop(victim)
                self._lru.pop(victim)
                self._slot_name[slot] = None
                self.evictions += 1
                log.info("adapter %r evicted from slot %d", victim, slot)
            self._write_slot(slot, self._get(name))
            self._slot_of[name], self._slot_name[slot] = slot, name
            self._lru[name] = None  # evictable until pinned below, so a failure half-way leaks no slot
        for name in names:
            self._pins[name] += 1
            self._lru.pop(name, None)
        return True

    def release(self, resolved: ResolvedMix, pinned: bool) -> None:
        """A request ended: unpin its slots (if it was admitted) and drop its holds; adapters
        waiting to unload go when their last holder does."""
        if pinned:
            for name in dict.fromkeys(n for n, _ in resolved.mix):
                self._pins[name] -= 1
                assert self._pins[name] >= 0, f"adapter {name!r} unpinned more often than pinned"
                if not self._pins[name]:
                    del self._pins[name]
                    if name in self._slot_of:
                        self._lru[name] = None
        for name in resolved.held:
            self._refs[name] -= 1
            assert self._refs[name] >= 0, f"adapter {name!r} released more often than resolved"
            if not self._refs[name]:
                del self._refs[name]
        for name in resolved.held:
            if self._doomed(name):
                self._drop_if_free(name)

    def slot(self, name: str) -> int:
        return self._slot_of[name]

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    def pinned(self, name: str) -> int:
        return self._pins[name]

    def held(self, name: str) -> int:
        return self._refs[name]

    # ---- the device table -------------------------------------------------------------------

    def _zero_tables(self) -> dict:
        nl, s, r = self.cfg.num_layers, self.max_loras, self.max_rank
        at = self._table_shardings or {}
        return {m: (jnp.zeros((nl, s, din, r), self._table_dtype, device=at.get(m, (None, None))[0]),
                    jnp.zeros((nl, s, r, dout), self._table_dtype, device=at.get(m, (None, None))[1]))
                for m, (din, dout) in self._shapes.items()}

    def _zero_sparse_tables(self) -> dict:
        nl, s, b = self.cfg.num_layers, self.max_loras, self.sparse_block
        at = self._sparse_placement
        out = {}
        for part, caps in self.capacity.items():
            tail = (b, b) if part == "block" else ()
            out[part] = {m: (jnp.zeros((nl, s, n), jnp.int32, device=at),
                             jnp.zeros((nl, s, n, *tail), self._table_dtype, device=at))
                         for m, n in caps.items()}
        return out

    def tables_lost(self) -> bool:
        """Were the slot tables donated to a slot write that failed (so they are deleted now)?"""
        return any(t.is_deleted() for t in jax.tree.leaves((self.tables, self.sparse_tables)))

    def reset_tables(self) -> None:
        """Rebuild the slot tables from the host copies of every resident adapter (after `tables_lost`)."""
        self.tables = self._zero_tables()
        self.sparse_tables = self._zero_sparse_tables()
        for name, slot in self._slot_of.items():
            self._write_slot(slot, self._get(name))

    def _get(self, name: str) -> LoraAdapter:
        return self._merged[name] if name in self._merged else self._adapters[name]

    def _cast(self, values: np.ndarray) -> np.ndarray:
        """Host float32 slot values in the tables' dtype (uint16 bits for bits16 tables)."""
        return bf16_bits(values) if self._bits16 else values.astype(self.dtype)

    def _write_slot(self, slot: int, adapter: LoraAdapter, parts=None) -> None:
        """Write `adapter` into `slot`: only the tables of its own parts (default `adapter.parts`).

        A slot's other tables keep whatever an earlier occupant left: the runner makes pairs only
        for the parts a slot holds (`parts(slot)`), so those rows are never read. Writing zeros
        there made a LoRA slot write 53-121 ms instead of 23-25 in an engine with every kind's
        tables (bench/sparse.py's `load_times`, README "Sparse adapters in one batch").
        """
        parts = adapter.parts if parts is None else parts
        r, nl = self.max_rank, self.cfg.num_layers
        self._slot_parts[slot] = frozenset()  # a failed write below leaves the slot unused, not half-read
        if "lora" in parts:
            values = {}
            for m in MODULES:
                din, dout = self._shapes[m]
                a, b = np.zeros((nl, din, r), np.float32), np.zeros((nl, r, dout), np.float32)
                for layer in range(nl):
                    mod = adapter.modules.get((layer, m))
                    if mod is not None:
                        a[layer, :, :mod.rank] = mod.a
                        b[layer, :mod.rank] = mod.b * np.float32(mod.scale)
                values[m] = (jax.device_put(self._cast(a)), jax.device_put(self._cast(b)))
            self.tables = self._set(self.tables, np.int32(slot), values)
        for part, caps in self.capacity.items():
            if part in parts:
                values = {m: _sparse_slot(adapter, m, part, nl, n, self._shapes[m], self.sparse_block, self._cast)
                          for m, n in caps.items()}
                self.sparse_tables = {**self.sparse_tables,
                                      part: self._set_sparse(self.sparse_tables[part], np.int32(slot), values)}
        self._slot_parts[slot] = adapter.parts


def _sparse_slot(adapter: LoraAdapter, module: str, part: str, nl: int, cap: int, shape, b: int, cast):
    """Host (idx i32[L, cap], val [L, cap(, b, b)]) of one adapter's `part` of `module`, in the
    sorted, padded layout of kernels/sparse.py (scale folded into the values)."""
    din, dout = shape
    idx = np.zeros((nl, cap), np.int32)
    val = np.zeros((nl, cap) + ((b, b) if part == "block" else ()), np.float32)
    for layer in range(nl):
        m = adapter.sparse.get((layer, module))
        if m is None or m.kind != part:
            continue
        if part == "sparse":
            m = m.folded()
            flat = m.cols.astype(np.int64) * dout + m.rows
            order = np.argsort(flat, kind="stable")
            n = flat.size
            idx[layer, :n], val[layer, :n] = flat[order], m.values[order]
        else:
            m = m.split(b)
            flat = m.row_blk.astype(np.int64) * (din // b) + m.col_blk  # sorted by split()
            n = flat.size
            idx[layer, :n], val[layer, :n] = flat, m.blocks
        if 0 < n < cap:
            idx[layer, n:] = idx[layer, n - 1]  # padding repeats the last index with value 0: stays sorted
    return jax.device_put(idx), jax.device_put(cast(val))


def sparse_capacity(adapters: list[LoraAdapter], cfg: ModelConfig, sparse_block: int = 16) -> tuple[int, int]:
    """(max_sparse_rank, max_block_rank) just large enough for every sparse module of `adapters`
    (0 where none has that kind): the capacities `serve` sizes its tables by by default."""
    need = {"sparse": 0, "block": 0}
    for adapter in adapters:
        for (_, module), m in adapter.sparse.items():
            din, dout = m.shape
            values = m.nnz if m.kind == "sparse" else m.nblocks * m.block ** 2
            need[m.kind] = max(need[m.kind], math.ceil(values / (din + dout)))
    return need["sparse"], need["block"]
