"""An asyncio HTTP load generator for OpenAI-compatible /v1/completions servers (streaming SSE).

    python bench/loadgen.py --url http://127.0.0.1:8080 --vocab-size 151643 --num-requests 8 --concurrency 2

N requests are sent with at most C in flight (a semaphore). Each request is a prompt of random token
ids (never text, so every engine sees the same input) with a fixed `max_tokens`, `ignore_eos` and
greedy sampling; prompt and output lengths are drawn uniformly from ranges with a fixed seed, so two
engines get the identical request list. Per request it measures, from the SSE stream:

- TTFT: request sent -> first chunk that carries text;
- ITL: the gaps between consecutive text-carrying chunks (a chunk that carries several tokens
  counts once, as in vLLM's benchmark_serving);
- TPOT: (e2e - TTFT) / (output tokens - 1), which does not depend on how tokens are chunked;
- e2e latency and output tokens (`usage.completion_tokens` when the server sends it, else the
  number of text chunks).

The run's output tokens/s is total output tokens / wall time (first request sent -> last one
done); request throughput is successful requests / wall time. Every request has a timeout; errors
and timeouts are counted and never hang the run. Only loopback targets are allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import numpy as np

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int


@dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    ok: bool = False
    error: str | None = None
    error_kind: str | None = None  # http_<status>, in_stream, timeout, no_text, or the exception type
    output_tokens: int = 0  # usage.completion_tokens, else text chunks
    chunks: int = 0  # text-carrying SSE chunks
    ttft: float | None = None  # seconds
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # perf_counter when sent
    finish_reason: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def make_requests(n: int, allowed_ids: np.ndarray | int, prompt_len: tuple[int, int] = (64, 512),
                  output_len: tuple[int, int] = (32, 128), seed: int = 0) -> list[RequestSpec]:
    """`n` requests with prompt/output lengths uniform in the inclusive ranges, ids drawn from
    `allowed_ids` (an int v means range(v)); the same arguments always give the same list."""
    if prompt_len[0] < 1 or prompt_len[0] > prompt_len[1] or output_len[0] < 1 or output_len[0] > output_len[1]:
        raise ValueError(f"bad length ranges: prompt {prompt_len}, output {output_len}")
    ids = np.arange(allowed_ids) if isinstance(allowed_ids, (int, np.integer)) else np.asarray(allowed_ids)
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(n):
        p = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        o = int(rng.integers(output_len[0], output_len[1] + 1))
        specs.append(RequestSpec(ids[rng.integers(0, len(ids), p)].tolist(), o))
    return specs


def check_loopback(url: str) -> str:
    """`url` without a trailing slash, if it points at this machine; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"{url!r}: only http://127.0.0.1 (loopback) targets are allowed")
    return url.rstrip("/")


def request_body(spec: RequestSpec, model: str | None = None, extra: dict | None = None) -> dict:
    body = dict(prompt=spec.prompt, max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True, stream=True,
                stream_options={"include_usage": True})
    if model:
        body["model"] = model
    body.update(extra or {})
    return body


async def send_one(client, url: str, spec: RequestSpec, timeout: float, *, model: str | None = None,
                   extra_body: dict | None = None) -> RequestResult:
    """POST one streaming completion and time its chunks; never raises (errors land in the result)."""
    res = RequestResult(len(spec.prompt), spec.max_tokens)
    state = dict(usage_tokens=None, last=None)

    async def stream() -> None:
        async with client.stream("POST", url + "/v1/completions", json=request_body(spec, model, extra_body)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                res.error, res.error_kind = f"HTTP {r.status_code}: {body[:300]}", f"http_{r.status_code}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                now = time.perf_counter()
                msg = json.loads(data)
                if "error" in msg:
                    res.error, res.error_kind = f"in-stream error: {json.dumps(msg['error'])[:300]}", "in_stream"
                    return
                if msg.get("usage"):
                    state["usage_tokens"] = msg["usage"].get("completion_tokens", state["usage_tokens"])
                for choice in msg.get("choices") or ():
                    if choice.get("text"):
                        if state["last"] is None:
                            res.ttft = now - res.start
                        else:
                            res.itl.append(now - state["last"])
                        state["last"] = now
                        res.chunks += 1
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]

    res.start = time.perf_counter()
    try:
        await asyncio.wait_for(stream(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        res.error, res.error_kind = f"timeout after {timeout:.0f} s ({res.chunks} chunks received)", "timeout"
    except Exception as e:  # connection refused/reset, bad JSON, protocol errors: count it, go on
        res.error, res.error_kind = f"{type(e).__name__}: {e}"[:300], type(e).__name__
    if res.error is None:
        res.e2e = time.perf_counter() - res.start
        usage = state["usage_tokens"]
        res.output_tokens = usage if usage is not None else res.chunks
        if res.ttft is None:
            res.error = f"no text in the stream (finish_reason {res.finish_reason!r}, tokens {res.output_tokens})"
            res.error_kind = "no_text"
        else:
            res.ok = True
    return res


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict:
    if not xs:
        return {f"p{p}": None for p in ps} | {"mean": None}
    a = np.asarray(xs, dtype=np.float64)
    return {f"p{p}": float(np.percentile(a, p)) for p in ps} | {"mean": float(a.mean())}


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error_kind or "?"
            errors[key] = errors.get(key, 0) + 1
    return dict(
        num_requests=len(results), completed=len(ok), failed=len(results) - len(ok), errors=errors,
        first_error=next((r.error for r in results if not r.ok), None),
        wall_s=wall, input_tokens=sum(r.prompt_len for r in ok), output_tokens=out_tokens,
        output_tok_s=out_tokens / wall if wall > 0 else 0.0,
        total_tok_s=(out_tokens + sum(r.prompt_len for r in ok)) / wall if wall > 0 else 0.0,
        req_s=len(ok) / wall if wall > 0 else 0.0,
        short_outputs=sum(r.output_tokens < r.max_tokens for r in ok),  # stopped early (EOS) or chunked count
        ttft_s=percentiles([r.ttft for r in ok]),
        itl_s=percentiles([x for r in ok for x in r.itl]),
        tpot_s=percentiles([r.tpot for r in ok if r.tpot is not None]),
        e2e_s=percentiles([r.e2e for r in ok]),
    )


async def run_load_async(url: str, specs: list[RequestSpec], concurrency: int, *, timeout: float = 600.0,
                         model: str | None = None, extra_body: dict | None = None, progress: bool = True,
                         desc: str = "requests") -> dict:
    """Send `specs` with at most `concurrency` in flight; returns summarize(...) plus `requests`."""
    import httpx

    url = check_loopback(url)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    # The per-request deadline is asyncio.wait_for in send_one; httpx's own read timeout only guards
    # a stalled socket (a long prefill queue can keep a stream silent for minutes).
    http_timeout = httpx.Timeout(timeout, connect=30.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)
    failed = 0

    async def one(client, spec):
        nonlocal failed
        async with sem:
            r = await send_one(client, url, spec, timeout, model=model, extra_body=extra_body)
        if bar is not None:
            failed += not r.ok
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed)
        return r

    try:
        async with httpx.AsyncClient(limits=limits, timeout=http_timeout, trust_env=False) as client:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(client, s) for s in specs))
            wall = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(results, wall)
    summary["concurrency"] = concurrency
    reqs = []
    for r in results:
        d = asdict(r)
        d.pop("itl")
        d["start"] = r.start - t0
        d["tpot"] = r.tpot
        reqs.append(d)
    summary["requests"] = reqs
    return summary


def run_load(url: str, specs: list[RequestSpec], concurrency: int, **kw) -> dict:
    """Blocking wrapper of run_load_async."""
    return asyncio.run(run_load_async(url, specs, concurrency, **kw))


def gguf_prompt_ids(path: str) -> np.ndarray:
    """Token ids a random prompt may use: the GGUF vocabulary's normal tokens (no control/special ids)."""
    import gguf

    r = gguf.GGUFReader(path)
    n = len(r.fields["tokenizer.ggml.tokens"].data)
    f = r.fields.get("tokenizer.ggml.token_type")
    if f is None:
        return np.arange(n)
    types = np.array([int(f.parts[i][0]) for i in f.data])
    return np.flatnonzero(types == 1)  # gguf.TokenType.NORMAL


def fmt_ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{1000 * x:.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080 (loopback only)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--vocab-size", type=int, help="draw prompt ids below this")
    src.add_argument("--gguf", help="draw prompt ids from this GGUF's normal tokens")
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    ap.add_argument("--model", default=None, help="the 'model' field to send (default: none)")
    ap.add_argument("--json", action="store_true", help="print the whole result as JSON")
    a = ap.parse_args(argv)
    ids = a.vocab_size if a.vocab_size else gguf_prompt_ids(a.gguf)
    specs = make_requests(a.num_requests, ids, tuple(a.prompt_len), tuple(a.output_len), a.seed)
    s = run_load(a.url, specs, a.concurrency, timeout=a.timeout, model=a.model)
    if a.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"{s['completed']}/{s['num_requests']} ok in {s['wall_s']:.1f} s: {s['output_tok_s']:.2f} output tok/s, "
              f"{s['req_s']:.3f} req/s; TTFT p50/p99 {fmt_ms(s['ttft_s']['p50'])}/{fmt_ms(s['ttft_s']['p99'])} ms, "
              f"ITL p50/p99 {fmt_ms(s['itl_s']['p50'])}/{fmt_ms(s['itl_s']['p99'])} ms"
              + (f"; errors {s['errors']} (first: {s['first_error']})" if s["failed"] else ""))
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
