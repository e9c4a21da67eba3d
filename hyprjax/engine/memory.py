"""How big the KV pool is: a memory budget in bytes or as a fraction of free memory, turned into pages.

`--kv-cache-memory` takes `512MiB`, `2G`, `1.5GB`, `1073741824` (bytes) or `0.25` / `25%` (of
the device's free memory when the engine is built, i.e. after the weights are loaded: on CPU
MemAvailable from /proc/meminfo; on GPU/TPU the allocator's bytes_limit - bytes_in_use). With
none given the pool is 192 MiB on CPU (8,736 tokens of the default SmolLM2-135M in the bfloat16
cache `--kv-cache-dtype auto` keeps for its int8 weights; 5,456 of Gemma 3 270M in float32), so
`hyprjax serve` stays small (Gemma with f32 weights ~1.1 GB stayed under 2 GiB resident, measured:
docs/engine.md), and 0.9 of free memory on GPU/TPU, where the pool is what buys concurrency.
"""

from __future__ import annotations

import logging
import os
import re

import jax

from ..config import ModelConfig
from ..errors import ConfigError

log = logging.getLogger("hyprjax.engine")

CPU_DEFAULT_BYTES = 192 * 2**20
ACCELERATOR_DEFAULT_FRACTION = 0.9

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*")


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes (GiB/MiB binary, GB/MB decimal, bare G/M binary)."""
    m = _NUMBER.fullmatch(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 2GiB, 512MiB or 1.5GB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be > 0")
    return value


def parse_kv_memory(text: str) -> int | float:
    """A KV budget: bytes (`512MiB`, `2G`, `1073741824`) -> int, or a fraction of free memory
    (`0.25`, `25%`, written with a decimal point or a percent sign, in (0, 1]) -> float."""
    m = _NUMBER.fullmatch(text)
    if m is not None and (m.group(2) == "%" or (not m.group(2) and "." in m.group(1))):
        fraction = float(m.group(1)) / (100 if m.group(2) == "%" else 1)
        if not 0 < fraction <= 1:
            raise ValueError(f"kv cache memory {text!r}: a fraction of free memory must be in (0, 1] "
                             f"(0.25 or 25%); for bytes add a unit, e.g. 1.5GiB")
        return fraction
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"kv cache memory {text!r} is neither a size nor a fraction of free memory; write e.g. "
                         f"512MiB, 2G, 1073741824 (bytes) or 0.25 (a quarter of free memory)") from None


def check_kv_memory(value) -> None:
    """ConfigError unless `value` is None, an int of bytes >= 1, or a float fraction in (0, 1]."""
    ok = (value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
          or (isinstance(value, float) and 0 < value <= 1))
    if not ok:
        raise ConfigError(f"engine setting kv_cache_memory must be bytes (an int >= 1), a fraction of free memory "
                          f"(a float in (0, 1]) or None (the platform default), got {value!r}; "
                          f"hyprjax.engine.memory.parse_kv_memory reads '2GiB' or '0.25'")


def free_memory_bytes(device=None) -> int:
    """Bytes free on `device` (default: the first local device): MemAvailable on CPU, the
    allocator's bytes_limit - bytes_in_use on GPU/TPU."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return max(0, stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        raise ConfigError(f"{device.device_kind} reports no memory limit; give --kv-cache-memory in bytes (e.g. 8GiB)")
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:  # no /proc (macOS): free pages, an underestimate (no page cache), so a safe one
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise ConfigError("cannot tell free memory on this host; give --kv-cache-memory in bytes (e.g. 1GiB)") from None


def default_kv_memory(platform: str) -> int | float:
    """The budget when none is given: 192 MiB on CPU, 0.9 of free memory on GPU/TPU."""
    return CPU_DEFAULT_BYTES if platform == "cpu" else ACCELERATOR_DEFAULT_FRACTION


def page_bytes(cfg: ModelConfig, page_size: int, dtype_bytes: int) -> int:
    """Bytes of one page in every layer: K and V x layers x page_size x kv heads x head dim x dtype bytes."""
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def pool_devices(mesh):
    """The devices an engine's KV pool lives on: None (the first local device) without a mesh,
    else the mesh's devices. A data-parallel replica's mesh is its own devices: measuring device
    0 instead sized replica 1's pool from what replica 0 had left there (~9% of a GPU)."""
    return None if mesh is None else list(mesh.devices.flat)


def _fullest(devices) -> tuple[int, object]:
    """(free bytes, device) of this process's device with the least free memory (measured only
    when a budget is a fraction: a device without memory stats fails the measurement; another
    process's devices cannot be measured from here). CPU devices share one host memory."""
    if devices[0].platform == "cpu":
        devices = devices[:1]
    local = [d for d in devices if getattr(d, "process_index", 0) == jax.process_index()] or devices[:1]
    free, i = min((free_memory_bytes(d), i) for i, d in enumerate(local))
    return free, local[i]


def kv_pool_pages(cfg: ModelConfig, ecfg, dtype_bytes: int, *, device=None, kv_shards: int = 1,
                  extra_page_bytes: int = 0) -> tuple[int, int]:
    """(num_pages, page_bytes) of the KV pool: `ecfg.num_pages` when set, else as many pages as
    fit `ecfg.kv_cache_memory` (bytes, or a fraction of `device`'s free memory now; None is the
    platform default). `device` may be a list (`pool_devices`): a fraction is then of the free
    memory of the fullest of them. ConfigError if the budget holds fewer than two pages.

    `kv_shards`: how many devices split each page (tensor parallelism over kv heads). On GPU/TPU
    the budget is per device, as vLLM's is, and a device holds 1/kv_shards of every page, so the
    pool gets kv_shards times the pages. On CPU every device lives in the same host memory, so
    the budget is for the whole pool whatever the mesh.

    `extra_page_bytes`: what each page costs besides (a draft model's pool, addressed by the
    same page ids: engine/spec_draft.py), so both pools share the budget. That pool is not
    sharded: under tensor parallelism one device holds all of it.
    """
    per_page = page_bytes(cfg, ecfg.page_size, dtype_bytes) + extra_page_bytes
    if ecfg.num_pages is not None:
        return ecfg.num_pages, per_page
    devices = device if isinstance(device, (list, tuple)) else [device or jax.local_devices()[0]]
    device = devices[0]
    shards = 1 if device.platform == "cpu" else max(1, kv_shards)
    budget = ecfg.kv_cache_memory
    if budget is None:
        budget = default_kv_memory(device.platform)
    if isinstance(budget, float):
        free, device = _fullest(devices)
        log.info("KV budget: %.2f of %.1f MiB free on %s = %.1f MiB", budget, free / 2**20, device.platform,
                 budget * free / 2**20)
        budget = int(budget * free)
    # Per device: a page's target bytes are split over the shards, the extra (unsharded) are not.
    num_pages = budget * shards // (per_page + extra_page_bytes * (shards - 1))
    if num_pages < 2:
        raise ConfigError(f"a KV budget of {budget} bytes holds {num_pages} of the 2 pages the pool needs at least "
                          f"({ecfg.page_size} tokens, {per_page} bytes each): give kv_cache_memory >= "
                          f"{2 * per_page // shards} bytes, or num_pages")
    return num_pages, per_page


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = 2, mmap_threshold: int = 256 * 2**10) -> bool:
    """Cap glibc's malloc arenas (`M_ARENA_MAX`) and fix its mmap threshold, before the serving
    threads start.

    glibc gives each thread that allocates its own arena (up to 8 per core), and each keeps the
    space its thread freed; XLA's worker threads, the engine thread and the HTTP threads each
    grow one. Two arenas cost nothing measurable here and kept ~100 MB less resident after the
    warm-up (default model). glibc also raises its mmap threshold each time a large block is
    freed (up to 32 MiB), after which compile-time and step temporaries land in the heap and
    fragment it; a fixed 256 KiB threshold keeps them in their own mappings, returned on free
    (~17 MB less after the warm-up, measured). Returns whether glibc took the settings.
    """
    libc = _libc()
    try:  # -8: M_ARENA_MAX, -3: M_MMAP_THRESHOLD
        return bool(libc is not None and libc.mallopt(-8, arenas) and libc.mallopt(-3, mmap_threshold))
    except AttributeError:
        return False


def release_free_memory() -> int:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`); returns bytes released.

    Loading dequantizes tensors through temporaries and the warm-up runs every step bucket once;
    glibc keeps the freed space mapped (~150-250 MB for the default model, measured), which is
    resident memory the server never needs again. A no-op (0) where there is no glibc.
    """
    before, libc = _rss_bytes(), _libc()
    try:
        if libc is None:
            return 0
        libc.malloc_trim(0)
    except AttributeError:
        return 0
    return max(0, before - _rss_bytes())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
