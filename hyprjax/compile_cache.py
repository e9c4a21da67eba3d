"""JAX's persistent compilation cache, on by default: a second start loads its compiled steps from disk.

Serving compiles every step bucket at start-up (minutes on a 2-core CPU). With the cache on, each
compiled executable is written to a directory keyed by a hash of the program, the backend and
the XLA flags, and a later process with the same model and settings loads it instead of
compiling. This works on XLA:CPU too (JAX 0.10.2: cache hits measured across processes; see
docs/cpu.md). XLA:CPU checks at load time that the host CPU has every feature the entry was
compiled for and recompiles if not, so a cache directory shared between machines is safe.

The directory: `enable_compile_cache(path)` if given, else `$HYPRJAX_CACHE_DIR`, else
`$XDG_CACHE_HOME/hyprjax/jax` (`~/.cache/hyprjax/jax`). The cache is trusted code: keep it in a
directory only you can write to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

ENV_VAR = "HYPRJAX_CACHE_DIR"
MIN_SECS_VAR = "HYPRJAX_CACHE_MIN_COMPILE_SECS"
# Only programs that took this long to compile are written: every step bucket (1-10 s each on
# 2 cores), not the hundreds of tiny helper programs (a warm start recompiles those in well
# under a second). Writing every program, however small, once ended a long test process in a
# segfault inside XLA:CPU's executable serialization (JAX 0.10.2, `put_executable_and_time`).
DEFAULT_MIN_COMPILE_SECS = 0.5
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_stats = {"hits": 0, "misses": 0}  # this process's persistent-cache lookups, counted from JAX's events
_listening = False


def _count(event: str, **kwargs) -> None:
    if event in _EVENTS:
        _stats[_EVENTS[event]] += 1


def cache_stats() -> dict[str, int]:
    """{'hits': programs loaded from the cache, 'misses': programs compiled (and written)} so far."""
    return dict(_stats)


def default_cache_dir() -> Path:
    """`$HYPRJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/hyprjax/jax`, else `~/.cache/hyprjax/jax`."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "hyprjax" / "jax"


def resolve_cache_dir(path: str | os.PathLike | bool | None = None) -> Path | None:
    """The directory `enable_compile_cache(path)` uses: `None` (cache off) for `False`, the default
    directory for `None`/`True`, else `path` itself. Touches nothing."""
    if path is False:
        return None
    if path is None or path is True:
        return default_cache_dir()
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"compile_cache={path!r} must be a directory, True, False or None")
    return Path(path).expanduser()


def enable_compile_cache(path: str | os.PathLike | bool | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on in `path` (see `resolve_cache_dir`), or off for `False`.

    `None` keeps what the process already chose (a `JAX_COMPILATION_CACHE_DIR`, an earlier call,
    the cache turned off), else uses the default directory; if that cannot be created the cache
    stays off with a warning (a read-only home must not stop a server). Programs that took at
    least `$HYPRJAX_CACHE_MIN_COMPILE_SECS` (default 0.5) to compile are cached. Calling again
    with the same choice does nothing. Returns the directory, or None when the cache is off.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    enabled, current = jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir
    if path is None and (current or not enabled):
        target = Path(current) if enabled else None
    else:
        target = resolve_cache_dir(path)
    if target is None:
        if enabled:
            jax.config.update("jax_enable_compilation_cache", False)
            cc.reset_cache()  # drop an open cache, so nothing more is read or written
            log.info("JAX compilation cache: off")
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
        if not os.access(target, os.W_OK | os.X_OK):
            raise PermissionError(f"{target}: not writable")
    except OSError as e:
        if path is not None or os.environ.get(ENV_VAR):
            raise OSError(f"compile cache directory {str(target)!r}: {e}") from None
        log.warning("JAX compilation cache off: cannot use %s (%s); set %s or pass --compile-cache DIR",
                    target, e, ENV_VAR)
        return None
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    min_secs = float(os.environ.get(MIN_SECS_VAR, DEFAULT_MIN_COMPILE_SECS))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor, no override
    if enabled and current and Path(current) == target:
        return target
    jax.config.update("jax_compilation_cache_dir", str(target))
    if not enabled or current:
        jax.config.update("jax_enable_compilation_cache", True)
        cc.reset_cache()  # JAX opens its cache once per process: another directory needs a reset
    log.info("JAX compilation cache: %s", target)
    return target
