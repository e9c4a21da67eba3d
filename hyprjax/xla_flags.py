"""XLA:CPU settings hyprjax applies at import, before JAX creates its CPU backend.

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler orders a
program's kernels to run independent ones concurrently. In the engine's layer program the paged
attention's two page gathers (K and V, each a gather fused with a transpose, split over both
cores) then ran side by side and took 3.4x as long as in the fused step. Measured on the
Qwen3-0.6B shape, 2-core EPYC, jax 0.10.2, the decode bucket timed directly
(pack + jitted step, median of 6), the layer-wise step with the default vs this setting:

| decode rows | default | concurrency scheduler off |
|---:|---:|---:|
| 1 | 72.6 ms | 70.3 ms |
| 8 | 143.4 ms | 143.6 ms |
| 32 | 540-640 ms | 304-376 ms |

(the fused one-program step it replaced: 418-452 ms at 32 rows).

An unknown flag in XLA_FLAGS aborts the process, so the flag is only added when this jaxlib
has it: known for jaxlib 0.10, otherwise looked up once in its library and remembered under
the cache directory. A flag the user set in XLA_FLAGS wins; `HYPRJAX_XLA_FLAGS=0` adds nothing.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
KNOWN = ("0.10.",)  # jaxlib versions measured with this flag


def _jaxlib_has(flag: str) -> bool:
    try:
        import jaxlib
        from jaxlib import version
    except ImportError:
        return False
    if version.__version__.startswith(KNOWN):
        return True
    cache = Path(os.environ.get("HYPRJAX_CACHE_DIR") or Path.home() / ".cache" / "hyprjax") / "xla_flags.json"
    key = f"{version.__version__}:{flag}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        found = False
        for lib in Path(jaxlib.__file__).parent.glob("*.so"):
            try:
                with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if m.find(flag.encode()) >= 0:
                        found = True
                        break
            except (OSError, ValueError):
                continue
        known[key] = found
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
        except OSError:
            pass
    return bool(known[key])


def apply() -> None:
    """Add hyprjax's XLA:CPU flags to XLA_FLAGS (module docstring); a no-op where JAX's
    backends already exist (the flags would not be read) or the user opted out."""
    if os.environ.get("HYPRJAX_XLA_FLAGS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags:
        return
    try:
        from jax._src import xla_bridge
        if getattr(xla_bridge, "_backends", None):
            return
    except ImportError:
        pass
    if _jaxlib_has(FLAG):
        os.environ["XLA_FLAGS"] = f"{flags} --{FLAG}=false".strip()
