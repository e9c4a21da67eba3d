"""Soak: many streaming clients against one live server for a while, then three counts that must be 0.

    python bench/soak.py                                   # the default model, 64 clients, 10 minutes
    python bench/soak.py --model bench/models/tiny.gguf --clients 16 --duration 30   # CI-sized

The server is the real one (`hyprjax.serve.app.create_app` over the paged engine, under uvicorn
on 127.0.0.1), in this process, with two random rank-8 LoRA adapters. Each client loops until
the deadline, picking at random:
- a streamed chat or completion, greedy or seeded, on the base model, one adapter, or a weighted
  mix of both: its text is kept for the solo check;
- the same, but it disconnects after a few chunks (the server must abort it and free its pages);
- a malformed request (bad JSON, wrong types, an unknown adapter, a prompt over the context,
  too many stop strings, an oversized body): it must get a 4xx.

After the deadline the script waits for the engine to drain, then reports:
- **5xx answers** (any route, any request): must be 0;
- **leaked KV pages**: pages still held by no request once the engine is idle (the pool's
  usage times its size; prefix-cached free pages count as free): must be 0;
- **solo mismatches**: completed greedy and seeded requests re-run one at a time on the idle
  server whose text differs from what they got under load: must be 0 (up to `--solo-checks`).

Writes bench/results/soak.json and prints a table. Progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAGE_SIZE = 16


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


def start_server(model: str, *, max_num_seqs: int, num_pages: int, max_model_len: int, quantization: str):
    """(base URL, the LLMEngine, the uvicorn server) of a live server with adapters 'alpha' and 'beta'."""
    import uvicorn

    from bench.lora import random_adapter
    from hyprjax.engine.async_engine import AsyncEngine
    from hyprjax.engine.config import EngineConfig
    from hyprjax.engine.llm_engine import LLMEngine
    from hyprjax.formats.load import load_model
    from hyprjax.serve.app import create_app

    loaded = load_model(model, quantization=quantization)
    ecfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(256, max_num_seqs),
                        page_size=PAGE_SIZE, num_pages=num_pages, max_model_len=max_model_len, max_loras=2,
                        max_lora_rank=8)
    engine = LLMEngine(loaded.model, loaded.cfg, loaded.tokenizer, ecfg)
    for i, name in enumerate(("alpha", "beta")):
        engine.add_adapter(random_adapter(loaded.cfg, name, 8, seed=i))
    front = AsyncEngine(None, "base", tokenizer=loaded.tokenizer)
    front.attach(engine)
    app = create_app(front, served_model_names=["base"], max_request_bytes=1 << 20)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", engine, server, front


WORDS = ("the river runs past old stone houses where people tell stories about winter light and quiet "
         "roads that lead to the sea while children count boats and birds").split()


def random_request(rng: random.Random, checked: bool) -> tuple[str, dict]:
    """(path, body) of a well-formed request; `checked` ones are greedy or seeded (reproducible)."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
    body = {"max_tokens": rng.randint(4, 48), "stream": True}
    if checked:
        body.update(temperature=0.0) if rng.random() < 0.6 else body.update(temperature=0.8, seed=rng.randint(0, 99))
    else:
        body.update(temperature=0.8)
    choice = rng.random()
    if choice < 0.3:
        body["model"] = rng.choice(["alpha", "beta"])
    elif choice < 0.55:
        w = round(rng.uniform(0.1, 1.0), 2)
        body.update(model="base", lora_adapters=["alpha", "beta"], lora_weights={"alpha": w, "beta": round(1 - w, 2)})
    else:
        body["model"] = "base"
    if rng.random() < 0.5:
        return "/v1/chat/completions", dict(body, messages=[{"role": "user", "content": words}])
    return "/v1/completions", dict(body, prompt=words)


def malformed(rng: random.Random, max_model_len: int) -> tuple[str, bytes | dict]:
    long_prompt = " ".join(["word"] * (max_model_len * 2))
    cases = [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", {"messages": "hello"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-adapter"}),
        ("/v1/completions", {"prompt": long_prompt, "max_tokens": 8}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
        ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 40}),
        ("/v1/completions", {"prompt": "hi", "lora_adapters": ["alpha"], "lora_weights": [1, 2]}),
        ("/v1/completions", {"prompt": "x" * (2 << 20)}),
        ("/v1/completions", {"prompt": [[1, 2], "mixed"]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
    ]
    return rng.choice(cases)


class Tally:
    def __init__(self):
        self.status: dict[int, int] = {}
        self.server_errors: list[str] = []
        self.done: list[dict] = []  # checked requests that ran to their end: path, body, text
        self.disconnects = self.malformed_ok = self.malformed_bad = 0
        self.tokens = 0

    def saw(self, status: int, what: str) -> None:
        self.status[status] = self.status.get(status, 0) + 1
        if status >= 500:
            self.server_errors.append(f"{status} {what}")


async def stream_text(client, url: str, path: str, body: dict, tally: Tally, cut_after: int | None):
    """Stream one request; the text it got, or None when cut or refused."""
    text = ""
    async with client.stream("POST", url + path, json=body) as r:
        tally.saw(r.status_code, f"{path} {json.dumps(body)[:200]}")
        if r.status_code != 200:
            await r.aread()
            return None
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                tally.saw(500, f"in-stream error {event['error']}")
                return None
            for c in event.get("choices", []):
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
            chunks += 1
            tally.tokens += 1
            if cut_after is not None and chunks >= cut_after:
                return None  # leaving the block closes the connection mid-stream
    return text


async def client_loop(i: int, url: str, deadline: float, tally: Tally, max_model_len: int, seed: int):
    import httpx

    rng = random.Random(seed * 1000 + i)
    async with httpx.AsyncClient(timeout=600) as client:
        while time.monotonic() < deadline:
            roll = rng.random()
            try:
                if roll < 0.12:
                    path, body = malformed(rng, max_model_len)
                    kw = {"content": body, "headers": {"Content-Type": "application/json"}} \
                        if isinstance(body, bytes) else {"json": body}
                    r = await client.post(url + path, **kw)
                    tally.saw(r.status_code, f"malformed {path}")
                    if 400 <= r.status_code < 500:
                        tally.malformed_ok += 1
                    else:
                        tally.malformed_bad += 1
                elif roll < 0.3:
                    path, body = random_request(rng, checked=False)
                    await stream_text(client, url, path, body, tally, cut_after=rng.randint(1, 4))
                    tally.disconnects += 1
                else:
                    path, body = random_request(rng, checked=True)
                    text = await stream_text(client, url, path, body, tally, cut_after=None)
                    if text is not None:
                        tally.done.append(dict(path=path, body=body, text=text))
            except httpx.HTTPError as e:
                tally.saw(599, f"transport error {type(e).__name__}: {e}")


async def solo_checks(url: str, done: list[dict], n: int, seed: int) -> tuple[int, int, list[dict]]:
    import httpx

    sample = random.Random(seed).sample(done, min(n, len(done)))
    mismatches = []
    async with httpx.AsyncClient(timeout=600) as client:
        for k, item in enumerate(sample):
            tally = Tally()
            text = await stream_text(client, url, item["path"], item["body"], tally, cut_after=None)
            if text != item["text"]:
                mismatches.append(dict(item, solo=text))
            if (k + 1) % 20 == 0:
                log(f"solo re-runs: {k + 1}/{len(sample)}, {len(mismatches)} differ")
    return len(sample), len(mismatches), mismatches


def run_soak(model: str, *, clients: int = 64, duration: float = 600.0, solo: int = 200, max_num_seqs: int = 32,
             num_pages: int = 512, max_model_len: int = 1024, quantization: str = "auto", seed: int = 0) -> dict:
    url, engine, server, front = start_server(model, max_num_seqs=max_num_seqs, num_pages=num_pages,
                                       max_model_len=max_model_len, quantization=quantization)
    try:
        log(f"server {url}: {clients} clients for {duration:.0f} s")
        tally = Tally()
        deadline = time.monotonic() + duration

        async def load():
            tasks = [asyncio.create_task(client_loop(i, url, deadline, tally, max_model_len, seed))
                     for i in range(clients)]
            while not all(t.done() for t in tasks):
                await asyncio.sleep(10)
                left = max(0.0, deadline - time.monotonic())
                log(f"{left:4.0f} s left: {len(tally.done)} completed, {tally.disconnects} cut, "
                    f"{tally.malformed_ok} malformed refused, {len(tally.server_errors)} 5xx, {tally.tokens} chunks")
            await asyncio.gather(*tasks)

        t0 = time.monotonic()
        asyncio.run(load())
        wall = time.monotonic() - t0
        for _ in range(600):  # drain: cut streams are aborted on the engine thread
            s = engine.stats()
            if s["num_running"] == 0 and s["num_waiting"] == 0:
                break
            time.sleep(0.1)
        stats = engine.stats()
        leaked = round(stats["kv_cache_usage"] * engine.block_manager.num_pages)
        log(f"drained: {stats['num_running']} running, {leaked} pages held")
        checked, differ, examples = asyncio.run(solo_checks(url, tally.done, solo, seed))
    finally:
        server.should_exit = True
        front.shutdown()
    result = dict(model=str(model), clients=clients, duration_s=duration, wall_s=round(wall, 1),
                  completed=len(tally.done), disconnects=tally.disconnects, malformed_refused=tally.malformed_ok,
                  malformed_accepted=tally.malformed_bad, status_counts=tally.status,
                  server_errors=len(tally.server_errors), server_error_examples=tally.server_errors[:10],
                  leaked_pages=leaked, running_after_drain=stats["num_running"], solo_checked=checked,
                  solo_mismatches=differ, mismatch_examples=examples[:5], stream_chunks=tally.tokens,
                  preemptions=stats.get("num_preemptions_total"))
    return result


def table(r: dict) -> str:
    rows = [("5xx answers (must be 0)", r["server_errors"]), ("leaked KV pages after drain (must be 0)",
            r["leaked_pages"]), ("solo mismatches (must be 0)", f"{r['solo_mismatches']} of {r['solo_checked']}"),
            ("completed checked requests", r["completed"]), ("disconnects mid-stream", r["disconnects"]),
            ("malformed requests refused with 4xx", r["malformed_refused"]),
            ("malformed requests not refused", r["malformed_accepted"]), ("streamed chunks", r["stream_chunks"]),
            ("preemptions", r["preemptions"])]
    head = f"{r['clients']} clients, {r['duration_s']:.0f} s, {r['model']}\n\n| count | value |\n|---|---:|\n"
    return head + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="what the server loads (default: the default model)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--solo-checks", type=int, default=200, help="completed requests re-run alone, at most")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--num-pages", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--quantization", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/soak.json")
    a = p.parse_args(argv)
    if a.model is None:
        from hyprjax.default_model import default_model_path

        a.model = str(default_model_path())
    r = run_soak(a.model, clients=a.clients, duration=a.duration, solo=a.solo_checks, max_num_seqs=a.max_num_seqs,
                 num_pages=a.num_pages, max_model_len=a.max_model_len, quantization=a.quantization, seed=a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=2))
    print(table(r))
    ok = r["server_errors"] == 0 and r["leaked_pages"] == 0 and r["solo_mismatches"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
