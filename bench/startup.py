"""Time to ready and resident memory of `hyprjax serve`, with a cold and then a warm compile cache.

    nice python bench/startup.py                        # the default model, a fresh cache directory
    nice python bench/startup.py --model path.gguf --cache-dir /tmp/cc --runs cold warm warm
    nice python bench/startup.py --runs off             # --no-compile-cache: compile everything

Each run starts `hyprjax serve` in a subprocess (`--compile-cache DIR`, or `--no-compile-cache` for
`off`), polls GET /health every 0.25 s until it answers 200 and records the seconds from launch;
reads the server's peak resident memory (VmHWM in /proc/PID/status) then, sends a few greedy
completions one at a time, and reads its current (VmRSS) and peak memory again; then stops it.
`cold` needs an empty cache directory (the script makes a fresh one unless --cache-dir is given;
a given one must be empty for a cold run); `warm` reuses what earlier runs wrote. The server's
`ready:` line says how many programs were loaded from the cache and how many compiled.

Prints a table and writes bench/results/startup.json (server logs: bench/results/serve_logs/startup-*.log).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve import ServerProcess, free_port, log  # noqa: E402


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS (resident now) of `pid`, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def dir_stats(path: Path) -> dict[str, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return dict(files=len(files), bytes=sum(p.stat().st_size for p in files))


def wait_ready(server: ServerProcess, timeout: float) -> float:
    """Seconds from launch until GET /health answered 200 (polled every 0.25 s)."""
    import httpx

    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.proc.returncode} before it was ready; "
                                   f"last output:\n{server.tail()}")
            try:
                if client.get(server.url + "/health").status_code == 200:
                    return time.perf_counter() - server.launched
            except httpx.HTTPError:
                pass
            if time.perf_counter() - server.launched > timeout:
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s; last output:\n{server.tail()}")
            time.sleep(0.25)


def completions(server: ServerProcess, n: int, max_tokens: int) -> list[float]:
    """Seconds per greedy completion, `n` of them one after another."""
    import httpx

    prompts = ["The three primary colors are", "Once upon a time", "The capital of France is",
               "A list of prime numbers: 2, 3, 5,"]
    out = []
    with httpx.Client(timeout=600.0, trust_env=False) as client:
        model = client.get(server.url + "/v1/models").json()["data"][0]["id"]
        for i in range(n):
            t = time.perf_counter()
            r = client.post(server.url + "/v1/completions", json=dict(
                model=model, prompt=prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0))
            if r.status_code != 200:
                raise RuntimeError(f"completion {i} answered {r.status_code}: {r.text[:500]}")
            out.append(time.perf_counter() - t)
    return out


def one_run(a, label: str, cache_dir: Path, log_dir: Path) -> dict:
    if label == "cold" and dir_stats(cache_dir)["files"]:
        raise SystemExit(f"a cold run needs an empty cache directory; {cache_dir} has files")
    port = free_port()
    argv = [sys.executable, "-m", "hyprjax.cli", "serve", *([a.model] if a.model else []), "--host", "127.0.0.1",
            "--port", str(port), *shlex.split(a.serve_args)]
    argv += ["--no-compile-cache"] if label == "off" else ["--compile-cache", str(cache_dir)]
    before = dir_stats(cache_dir)
    log_path = log_dir / f"startup-{label}-{len(list(log_dir.glob(f'startup-{label}-*')))}.log"
    server = ServerProcess("hyprjax", argv, port, log_path, {})
    server.launched = time.perf_counter()
    server.start()
    try:
        ready_s = wait_ready(server, a.timeout)
        at_ready = proc_status(server.proc.pid)
        server.echo = False
        times = completions(server, a.completions, a.max_tokens)
        after = proc_status(server.proc.pid)
    finally:
        server.stop()
    m = re.search(r"compile cache: (\d+) programs loaded, (\d+) compiled", server.tail(20000))
    row = dict(run=label, ready_s=round(ready_s, 2), peak_rss_at_ready=at_ready["VmHWM"],
               rss_at_ready=at_ready["VmRSS"], peak_rss=after["VmHWM"], rss_after=after["VmRSS"],
               completions=len(times), completion_s=[round(t, 3) for t in times],
               cache_loaded=int(m.group(1)) if m else None, cache_compiled=int(m.group(2)) if m else None,
               cache_files_before=before["files"], cache_files_after=dir_stats(cache_dir)["files"],
               cache_bytes_after=dir_stats(cache_dir)["bytes"], load_avg_1min_after=os.getloadavg()[0],
               argv=shlex.join(argv[1:]))
    log(f"{label}: ready in {ready_s:.1f} s, peak RSS {after['VmHWM'] / 2**20:.0f} MiB")
    return row


def table(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["| run | launch -> /health 200 (s) | programs loaded / compiled | peak RSS at ready (MiB) | "
             "peak RSS (MiB) | RSS after completions (MiB) | cache files / MiB after |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lc = f"{r['cache_loaded']} / {r['cache_compiled']}" if r["cache_loaded"] is not None else "-"
        lines.append(f"| {r['run']} | {r['ready_s']:.1f} | {lc} | {mib(r['peak_rss_at_ready'])} | "
                     f"{mib(r['peak_rss'])} | {mib(r['rss_after'])} | "
                     f"{r['cache_files_after']} / {mib(r['cache_bytes_after'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="what `hyprjax serve` loads (default: the default model)")
    ap.add_argument("--cache-dir", default=None,
                    help="compile cache directory (default: a fresh temporary one, removed afterwards)")
    ap.add_argument("--runs", nargs="+", default=["cold", "warm"], choices=["cold", "warm", "off"],
                    help="starts, in order (default: cold warm)")
    ap.add_argument("--completions", type=int, default=4, help="completions after ready (default 4)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per completion (default 16)")
    ap.add_argument("--serve-args", default="", help="more `hyprjax serve` flags, one shell-quoted string")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a start may take (default 1800)")
    ap.add_argument("--out", default=str(HERE / "results" / "startup.json"))
    a = ap.parse_args(argv)

    tmp = None if a.cache_dir else tempfile.TemporaryDirectory(prefix="hyprjax-startup-")
    cache_dir = Path(a.cache_dir or tmp.name).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(a.out).parent / "serve_logs"  # ignored by git, as bench/serve.py's
    log_dir.mkdir(parents=True, exist_ok=True)
    import jax

    meta = dict(command=shlex.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                date=datetime.datetime.now().isoformat(timespec="seconds"), jax=jax.__version__,
                python=platform.python_version(), cpus=os.cpu_count(), nice=os.nice(0), model=a.model or "default",
                cache_dir=str(cache_dir) if a.cache_dir else "(a fresh temporary directory)")
    rows = []
    try:
        for label in a.runs:
            rows.append(one_run(a, label, cache_dir, log_dir))
            Path(a.out).write_text(json.dumps(dict(meta, rows=rows), indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
