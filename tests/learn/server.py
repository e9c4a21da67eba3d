"""`hyprjax serve --learn` as a real process on a tiny model, for the learning tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.make_model import build_tokenizer
from tests.tiny_models import make_hf_model

V = 512
CHATML = (Path(__file__).parents[2] / "hyprjax" / "templates" / "chatml.jinja").read_text()


def make_chat_model(d: Path) -> Path:
    """A tiny random Qwen3 with a byte-level BPE tokenizer and a ChatML template."""
    d.mkdir(parents=True, exist_ok=True)
    make_hf_model(d, "qwen3", vocab_size=V, eos_token_id=V - 1, max_position_embeddings=2048)
    build_tokenizer(V).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log
        self.http = httpx.Client(base_url=url, timeout=120)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def post(self, path: str, body: dict | None = None) -> httpx.Response:
        return self.http.post(path, json=body if body is not None else {})

    def status(self, name: str = "bot") -> dict:
        r = self.get(f"/v1/adapters/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_idle(self, name: str = "bot", timeout: float = 300) -> dict:
        """Wait for the adapter's round (if any) to end; its status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(name)
            if st["training"]["state"] == "idle":
                return st
            time.sleep(0.2)
        raise AssertionError(f"the round did not end in {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@contextlib.contextmanager
def learn_server(model: Path, db: Path, *args: str, env: dict | None = None, log_name: str = "server.log"):
    """`hyprjax serve MODEL --learn bot --learn-db DB ARGS`, ready; killed at the end."""
    port = _free_port()
    log = db.parent / log_name
    cmd = [sys.executable, "-m", "hyprjax.cli", "serve", str(model), "--port", str(port), "--learn-db", str(db),
           "--max-model-len", "2048", "--num-pages", "512", "--max-num-seqs", "8", *args]
    if "--learn" not in args:
        cmd += ["--learn", "bot"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=Path(__file__).parents[2])
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{server.tail()}")
            try:
                if server.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not become ready:\n{server.tail()}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
