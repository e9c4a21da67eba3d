"""Serving throughput and latency over HTTP, hyprjax's server vs llama.cpp's, side by side.

    python bench/serve.py --model bench/models/qwen3-0.6b-f16.gguf --concurrency 1 8 32
    python bench/serve.py --model ... --skip-hyprjax --concurrency 1 2 --num-requests 4 --output-len 8 16
    python bench/serve.py --model ... --llama-server build   # llama.cpp's llama-server built for this CPU

For each engine in turn (hyprjax, then llama.cpp) and each concurrency C, it starts the server
in a subprocess with C parallel sequences (hyprjax `--max-num-seqs C`; llama.cpp `n_parallel = C`
slots, continuous batching) and the same context per sequence (`--max-model-len`), waits for
`GET /health` = 200, warms up with a few short requests, sends `--num-requests` streaming
completions with at most C in flight (bench/loadgen.py: random token-id prompts, fixed
max_tokens, ignore_eos, greedy), and stops the server. Both engines get the identical requests.

Writes bench/results/serve.json (after every run, so partial results survive), prints a markdown
table (output tok/s, req/s, TTFT and ITL p50/p99, hyprjax/llama.cpp throughput ratio) and draws
bench/results/serve.png. Servers are always stopped, also on Ctrl-C or SIGTERM. Server output
goes to bench/results/serve_logs/ENGINE-cC.log. See docs/bench_serve.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from loadgen import fmt_ms, gguf_prompt_ids, make_requests, run_load  # noqa: E402

ENGINES = ("hyprjax", "llamacpp")
LABEL = {"hyprjax": "hyprjax", "llamacpp": "llama.cpp"}


def log(msg: str) -> None:
    print(f"[serve bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:  # loaded here, not in the forked child (which must not import: another thread may hold a lock)
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM if this process dies (even by SIGKILL), so none is orphaned."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG (Linux)


class ServerProcess:
    """A server subprocess in its own process group: output to a log file (echoed while starting)."""

    def __init__(self, engine: str, argv: list[str], port: int, log_path: Path, config: dict):
        self.engine, self.argv, self.port, self.log_path, self.config = engine, argv, port, log_path, config
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.echo = True
        self._tail = collections.deque(maxlen=64)
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"starting {LABEL[self.engine]}: {shlex.join(self.argv)}  (log: {self.log_path})")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        """Copy the server's output to the log file; echo it while starting (progress bars keep their
        carriage returns), minus the access-log lines of our own /health polls."""
        fd = self.proc.stdout.fileno()
        pending = b""
        with open(self.log_path, "wb") as f:
            while chunk := os.read(fd, 65536):
                f.write(chunk)
                f.flush()
                self._tail.append(chunk)
                if not self.echo:
                    pending = b""
                    continue
                pending += chunk
                cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
                done, pending = pending[:cut], pending[cut:]
                shown = b"".join(seg for seg in re.split(rb"(?<=[\r\n])", done) if b"GET /health" not in seg)
                if shown:
                    sys.stderr.buffer.write(shown)
                    sys.stderr.flush()

    def tail(self, n: int = 3000) -> str:
        return b"".join(self._tail).decode(errors="replace")[-n:]

    def wait_ready(self, timeout: float) -> float:
        """Seconds until GET /health answered 200; RuntimeError if the process exits or time runs out."""
        import httpx

        t0 = time.perf_counter()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{LABEL[self.engine]} server exited with status {self.proc.returncode} "
                                       f"before it was ready; last output:\n{self.tail()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"{LABEL[self.engine]} server not ready after {timeout:.0f} s; "
                                       f"last output:\n{self.tail()}")
                time.sleep(1.0)

    def info(self) -> dict:
        """What the running server says about itself (llama.cpp: /props; hyprjax: /v1/models)."""
        import httpx

        out = {}
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            for path in ("/props", "/v1/models"):
                try:
                    r = client.get(self.url + path)
                    if r.status_code == 200:
                        out[path] = r.json()
                except (httpx.HTTPError, ValueError):
                    pass
        props = out.get("/props")
        if props:  # keep the llama.cpp facts that matter, not the chat template
            gen = props.get("default_generation_settings", {})
            out["/props"] = dict(total_slots=props.get("total_slots"), n_ctx_per_slot=gen.get("n_ctx"),
                                 model_ftype=props.get("model_ftype"), build_info=props.get("build_info"))
        models = out.get("/v1/models")
        if isinstance(models, dict):  # the OpenAI part only (llama.cpp adds an Ollama-style list)
            out["/v1/models"] = [{k: m.get(k) for k in ("id", "max_model_len", "meta") if k in m}
                                 for m in models.get("data", [])]
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        log(f"stopping {LABEL[self.engine]} (pid {self.proc.pid})")
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)  # its own group (start_new_session): the server and its children
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                log(f"{LABEL[self.engine]} did not exit after {signal.Signals(sig).name}")
        if self.proc.stdin:
            self.proc.stdin.close()
        if self._reader:
            self._reader.join(5.0)


def hyprjax_server(a, concurrency: int, log_dir: Path) -> ServerProcess:
    port = free_port()
    extra = shlex.split(a.hyprjax_args)
    argv = [sys.executable, "-m", "hyprjax.cli", "serve", "--model", str(a.model), "--host", "127.0.0.1",
            "--port", str(port), "--max-num-seqs", str(concurrency), "--max-model-len", str(a.max_model_len),
            "--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    config = dict(max_num_seqs=concurrency, max_model_len=a.max_model_len,
                  max_num_batched_tokens=a.max_num_batched_tokens, extra_args=a.hyprjax_args)
    if not any(f.split("=")[0] in ("--num-pages", "--kv-cache-memory") for f in extra):
        # KV room for every sequence's whole context, as llama.cpp reserves n_ctx / n_parallel per slot
        # (the engine's default pool may be smaller, and then it preempts where llama.cpp does not).
        page = next((int(extra[i + 1]) for i, f in enumerate(extra[:-1]) if f == "--page-size"), 16)
        config["num_pages"] = concurrency * -(-a.max_model_len // page) + 1
        argv += ["--num-pages", str(config["num_pages"])]
    argv += extra
    return ServerProcess("hyprjax", argv, port, log_dir / f"hyprjax-c{concurrency}.log", config)


def llamacpp_server(a, concurrency: int, log_dir: Path) -> ServerProcess:
    port = free_port()
    config = dict(backend="xllamacpp (llama.cpp's server)", model=str(a.model), port=port, n_parallel=concurrency,
                  ctx_per_slot=a.max_model_len, n_ctx=a.max_model_len * concurrency, threads=a.threads,
                  n_batch=a.max_num_batched_tokens, n_ubatch=min(512, a.max_num_batched_tokens),
                  cont_batching=True, kv_unified=False, flash_attn="auto")
    if a.llama_server:  # llama.cpp's own binary, the same settings as its command-line flags
        config["backend"] = f"llama-server ({a.llama_server})"
        argv = [str(a.llama_server), "-m", config["model"], "--host", "127.0.0.1", "--port", str(port),
                "-np", str(concurrency), "-c", str(config["n_ctx"]), "-b", str(config["n_batch"]),
                "-ub", str(config["n_ubatch"]), "-t", str(a.threads), "-tb", str(a.threads), "-cb",
                "--no-kv-unified", "-fa", config["flash_attn"], "--metrics", "--no-webui"]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--llamacpp-worker", json.dumps(config)]
    return ServerProcess("llamacpp", argv, port, log_dir / f"llamacpp-c{concurrency}.log", config)


def llamacpp_worker(cfg: dict) -> None:
    """Child process: llama.cpp's server (xllamacpp) on 127.0.0.1:port until SIGTERM or the parent is gone."""
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = cfg["model"]
    p.n_parallel = cfg["n_parallel"]
    p.n_ctx = cfg["n_ctx"]  # split evenly over the slots (kv_unified off); llama.cpp pads each to 256
    p.kv_unified = cfg["kv_unified"]
    p.cont_batching = cfg["cont_batching"]
    p.n_batch, p.n_ubatch = cfg["n_batch"], cfg["n_ubatch"]
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = cfg["threads"]
    p.hostnames = ["127.0.0.1"]
    p.port = cfg["port"]
    p.endpoint_metrics = True
    p.ui = False
    server = xlc.Server(p)
    print(f"llama.cpp server (xllamacpp {xlc.__version__}) listening on {server.listening_address}; "
          f"{xlc.get_system_info().strip()}", flush=True)
    sys.stdin.read()  # returns when the parent closes the pipe or dies; SIGTERM ends us before that


def one_run(server: ServerProcess, a, concurrency: int, specs, warm_specs) -> dict:
    """Start `server`, warm it up, run the load, stop it; the row for serve.json."""
    row = dict(engine=server.engine, concurrency=concurrency, num_requests=len(specs), server=server.config,
               loadavg_before=os.getloadavg())
    try:
        server.start()
        row["startup_s"] = server.wait_ready(a.startup_timeout)
        server.echo = False  # from here on its output goes to the log only (the progress bar stays readable)
        log(f"{LABEL[server.engine]} ready after {row['startup_s']:.1f} s at {server.url}")
        row["server_info"] = server.info()
        if warm_specs:
            w = run_load(server.url, warm_specs, concurrency, timeout=a.timeout,
                         desc=f"{server.engine} c={concurrency} warm-up")
            row["warmup"] = {k: w[k] for k in ("num_requests", "completed", "failed", "errors", "first_error",
                                               "wall_s")}
            if w["completed"] == 0:
                raise RuntimeError(f"every warm-up request failed: {w['first_error']}")
        row["loadavg_start"] = os.getloadavg()
        r = run_load(server.url, specs, concurrency, timeout=a.timeout, desc=f"{server.engine} c={concurrency}")
        row.update(r)
        if r["failed"]:
            log(f"{r['failed']}/{r['num_requests']} requests failed: {r['errors']}; first: {r['first_error']}")
        log(f"{LABEL[server.engine]} c={concurrency}: {r['output_tok_s']:.2f} output tok/s, {r['req_s']:.3f} req/s, "
            f"TTFT p50 {fmt_ms(r['ttft_s']['p50'])} ms, ITL p50 {fmt_ms(r['itl_s']['p50'])} ms")
    except RuntimeError as e:
        log(f"{LABEL[server.engine]} c={concurrency} failed: {e}")
        row["error"] = str(e)
    finally:
        server.stop()
    return row


def ratios(rows: list[dict]) -> dict:
    """concurrency -> hyprjax / llama.cpp output tok/s, where both ran."""
    by = {(r["engine"], r["concurrency"]): r for r in rows if r.get("output_tok_s")}
    return {c: by["hyprjax", c]["output_tok_s"] / by["llamacpp", c]["output_tok_s"]
            for (e, c) in by if e == "hyprjax" and ("llamacpp", c) in by}


def table(rows: list[dict]) -> str:
    ratio = ratios(rows)
    lines = ["| concurrency | engine | ok / sent | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
             "| ITL p99 ms | TPOT p50 ms | hyprjax / llama.cpp tok/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["concurrency"], ENGINES.index(r["engine"]))):
        name, c = LABEL[r["engine"]], r["concurrency"]
        if "output_tok_s" not in r:
            why = str(r.get("error", "?")).splitlines()[0][:80].replace("|", "/")
            lines.append(f"| {c} | {name} | failed: {why} | | | | | | | | |")
            continue
        q = f"{ratio[c]:.2f}" if r["engine"] == "hyprjax" and c in ratio else ""
        lines.append(f"| {c} | {name} | {r['completed']} / {r['num_requests']} | {r['output_tok_s']:.2f} | "
                     f"{r['req_s']:.3f} | {fmt_ms(r['ttft_s']['p50'])} | {fmt_ms(r['ttft_s']['p99'])} | "
                     f"{fmt_ms(r['itl_s']['p50'])} | {fmt_ms(r['itl_s']['p99'])} | "
                     f"{fmt_ms(r['tpot_s']['p50'])} | {q} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, engine in enumerate(ENGINES):
        rs = sorted((r for r in rows if r["engine"] == engine and r.get("output_tok_s")),
                    key=lambda r: r["concurrency"])
        if not rs:
            continue
        cs, color = [r["concurrency"] for r in rs], f"C{i}"
        ax1.plot(cs, [r["output_tok_s"] for r in rs], "o-", color=color, label=LABEL[engine])
        for key, style in (("p50", "o-"), ("p99", "s--")):
            ys = [r["ttft_s"][key] for r in rs]
            ax2.plot(cs, ys, style, color=color, label=f"{LABEL[engine]} {key}")
    cs = sorted({r["concurrency"] for r in rows})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight = parallel sequences)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("output tokens/s")
    ax1.set_ylim(bottom=0)
    ax1.set_title("throughput")
    ax2.set_ylabel("TTFT, s")
    ax2.set_yscale("log")
    ax2.set_title("time to first token")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    log(f"wrote {out}")


def save(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(meta, rows=rows, throughput_ratio={str(k): v for k, v in ratios(rows).items()}),
                              indent=1))
    tmp.replace(out)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file both engines load (e.g. bench/models/qwen3-0.6b-f16.gguf)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                    help="requests in flight; also each server's parallel sequences (default 1 8 32)")
    ap.add_argument("--num-requests", type=int, default=None,
                    help="requests per concurrency (default max(4, 2 x concurrency))")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up requests (short outputs) after each server start, sent at the run's "
                         "concurrency (default min(4, concurrency); 0 = none)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"),
                    help="prompt tokens, uniform in [MIN, MAX] (default 64 512)")
    ap.add_argument("--output-len", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"),
                    help="max_tokens, uniform in [MIN, MAX] (default 32 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="context per sequence/slot, both engines (default prompt MAX + output MAX)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512,
                    help="tokens per engine step: hyprjax's flag and llama.cpp's n_batch (default 512)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    ap.add_argument("--llama-server", metavar="PATH|build",
                    help="run llama.cpp's own llama-server binary instead of xllamacpp's; 'build' builds it "
                         "for this CPU's instruction sets from llama-cpp-python's sdist (cached; about 5 minutes "
                         "on 2 idle cores the first time; bench/llamacpp.py, docs/llamacpp.md)")
    ap.add_argument("--hyprjax-args", default="", help="extra flags for `hyprjax serve`, one quoted string")
    ap.add_argument("--skip-hyprjax", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--timeout", type=float, default=900.0, help="per-request timeout, seconds (default 900)")
    ap.add_argument("--startup-timeout", type=float, default=1800.0,
                    help="seconds a server may take to load and compile before /health is 200 (default 1800)")
    ap.add_argument("--out", default=str(HERE / "results" / "serve.json"), help="JSON path; the PNG goes beside it")
    ap.add_argument("--log-dir", default=str(HERE / "results" / "serve_logs"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing --out JSON for (engine, concurrency) pairs not run now")
    ap.add_argument("--llamacpp-worker", metavar="JSON", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.llamacpp_worker:
        llamacpp_worker(json.loads(a.llamacpp_worker))
        return 0
    if not a.model or not Path(a.model).is_file():
        ap.error(f"--model must be a GGUF file (got {a.model!r})")
    a.model = Path(a.model).resolve()
    need = a.prompt_len[1] + a.output_len[1]
    a.max_model_len = a.max_model_len or need
    if a.max_model_len < need:
        ap.error(f"--max-model-len {a.max_model_len} < longest prompt + output ({need})")
    if min(a.concurrency) < 1:
        ap.error("concurrency must be >= 1")
    engines = [e for e in ENGINES if not getattr(a, f"skip_{e}")]
    if not engines:
        ap.error("both engines skipped: nothing to do")
    if "llamacpp" in engines and a.llama_server == "build":
        from llamacpp import LlamaCppError, build_llama_server

        try:
            a.llama_server = build_llama_server()
        except LlamaCppError as e:
            ap.error(f"--llama-server build: {e}")
    elif "llamacpp" in engines and a.llama_server:
        a.llama_server = Path(a.llama_server).resolve()
        if not os.access(a.llama_server, os.X_OK) or not a.llama_server.is_file():
            ap.error(f"--llama-server {str(a.llama_server)!r} is not an executable file (or pass 'build')")
    elif "llamacpp" in engines:
        import importlib.util

        if importlib.util.find_spec("xllamacpp") is None:
            ap.error("llama.cpp's server comes from xllamacpp: pip install xllamacpp==2026.10.11549 "
                     "(docs/llamacpp.md), or pass --llama-server build, or --skip-llamacpp")

    out, log_dir = Path(a.out), Path(a.log_dir)
    prompt_ids = gguf_prompt_ids(str(a.model))
    meta = dict(command=" ".join([Path(sys.executable).name] + sys.argv), model=str(a.model),
                model_bytes=a.model.stat().st_size, prompt_len=list(a.prompt_len), output_len=list(a.output_len),
                seed=a.seed, max_model_len=a.max_model_len, max_num_batched_tokens=a.max_num_batched_tokens,
                llamacpp_threads=a.threads, cpu_count=os.cpu_count(), prompt_id_pool=len(prompt_ids),
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    rows: list[dict] = []
    if a.merge and out.exists():
        rows = json.loads(out.read_text()).get("rows", [])
        now = {(e, c) for e in engines for c in a.concurrency}
        rows = [r for r in rows if (r["engine"], r["concurrency"]) not in now]

    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    server = None
    try:
        for engine in engines:
            for c in a.concurrency:
                n = a.num_requests or max(4, 2 * c)
                # One seed for every run: both engines get the same list, and a smaller run's list
                # is the start of a larger one's.
                specs = make_requests(n, prompt_ids, tuple(a.prompt_len), tuple(a.output_len), a.seed)
                nw = min(c, 4) if a.warmup is None else a.warmup
                warm_out = (min(8, a.output_len[0]), min(16, a.output_len[1]))
                warm = make_requests(nw, prompt_ids, tuple(a.prompt_len), warm_out, a.seed + 10_000) if nw else []
                make = hyprjax_server if engine == "hyprjax" else llamacpp_server
                server = make(a, c, log_dir)
                rows.append(one_run(server, a, c, specs, warm))
                server = None
                save(out, meta, rows)
    except KeyboardInterrupt as e:
        log(f"interrupted ({str(e) or 'Ctrl-C'}); stopping the server, keeping the finished runs")
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, old_term)
    if not rows:
        return 1
    save(out, meta, rows)
    log(f"wrote {out}")
    print(table(rows))
    plot(rows, out.with_suffix(".png"),
         f"{a.model.name}, prompts {a.prompt_len[0]}-{a.prompt_len[1]}, outputs {a.output_len[0]}-{a.output_len[1]} "
         f"tokens, context {a.max_model_len}/seq, {os.cpu_count()} CPU cores")
    return 0 if all("error" not in r and not r.get("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
