"""Engine faults seen over HTTP: the real engine and server on a tiny Qwen3, faults injected into the
engine's jitted step and its inbox handlers."""

import json
from pathlib import Path

import httpx
import jax
import pytest

from bench.make_model import build_tokenizer
from tests.tiny_models import make_hf_model
from hyprjax.engine.async_engine import AsyncEngine
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.formats.load import load_model
from hyprjax.generate import Generator
from hyprjax.sampling import SamplingParams

V = 512
CHATML = (Path(__file__).parents[2] / "hyprjax" / "templates" / "chatml.jinja").read_text()
ECFG = dict(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_seqs=2, page_size=8, num_pages=64,
            max_model_len=256, block_q=8, max_queue=16)
PROMPT = "The weather today"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    d = tmp_path_factory.mktemp("served_faults")
    make_hf_model(d, "qwen3", vocab_size=V, eos_token_id=V - 1)
    build_tokenizer(V).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return load_model(d, progress=False)


def _front(loaded) -> AsyncEngine:
    eng = LLMEngine(loaded.model, loaded.cfg, loaded.tokenizer, EngineConfig(**ECFG), warmup=False, progress=False)
    front = AsyncEngine(eng, "tiny")
    front.start()
    return front


@pytest.fixture(scope="module")
def engine(loaded):
    front = _front(loaded)
    yield front
    front.shutdown()


@pytest.fixture(scope="module")
def expected(loaded) -> str:
    gen = Generator(loaded.model, loaded.cfg, loaded.tokenizer, max_model_len=256)
    ids = loaded.tokenizer.encode(PROMPT)
    return gen.generate([ids], [SamplingParams(max_tokens=10, temperature=0.0)])[0].text


def _break_step(monkeypatch, runner, *, delete: bool = True):
    """The runner's jitted step raises once, after deleting the device state it was donated."""
    real = runner._step

    def step(*args, **kwargs):
        monkeypatch.setattr(runner, "_step", real)
        if delete:
            for x in jax.tree.leaves((runner.cache, runner.counts, runner.seen)):
                x.delete()
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(runner, "_step", step)


def _complete(url: str, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def test_a_failed_step_is_a_500_naming_it_and_the_next_request_is_right(make_server, engine, expected, monkeypatch):
    url = make_server(engine)
    _break_step(monkeypatch, engine.engine.runner)
    r = _complete(url)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "engine_step_failed"
    assert "injected step failure" in err["message"] and "Traceback" not in err["message"]
    assert httpx.get(url + "/health").status_code == 200  # recovered: healthy, not 200 over deleted buffers
    assert not engine.engine.runner.state_lost()
    ok = _complete(url)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected


def test_a_step_failing_mid_stream_ends_that_stream_in_band(make_server, engine, expected, monkeypatch):
    url = make_server(engine)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        _break_step(monkeypatch, engine.engine.runner)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][len("data: "):])["error"]
    assert err["code"] == "engine_step_failed" and "injected step failure" in err["message"]
    assert _complete(url).json()["choices"][0]["text"] == expected


def test_an_add_handler_that_raises_answers_that_request_only(make_server, engine, expected, monkeypatch):
    url = make_server(engine)
    real = engine.engine.add_request

    def add_once(*args, **kwargs):
        monkeypatch.setattr(engine.engine, "add_request", real)
        raise KeyError("injected add failure")

    monkeypatch.setattr(engine.engine, "add_request", add_once)
    r = _complete(url)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert engine.ready and _complete(url).json()["choices"][0]["text"] == expected


def test_an_engine_that_cannot_recover_is_unhealthy_with_the_reason(make_server, loaded, monkeypatch):
    front = _front(loaded)
    try:
        url = make_server(front)
        assert httpx.get(url + "/health").status_code == 200
        _break_step(monkeypatch, front.engine.runner)

        def no_pool():
            raise RuntimeError("RESOURCE_EXHAUSTED: no memory for a new KV pool")

        monkeypatch.setattr(front.engine.runner, "reset_state", no_pool)
        r = _complete(url)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
        assert "RESOURCE_EXHAUSTED" in r.json()["error"]["message"]
        health = httpx.get(url + "/health")
        assert health.status_code == 500 and health.json()["status"] == "error"
        assert "RESOURCE_EXHAUSTED" in health.json()["reason"] and "injected step failure" in health.json()["reason"]
        again = _complete(url)  # answered at once with the reason, never queued behind a dead loop
        assert again.status_code == 500 and "RESOURCE_EXHAUSTED" in again.json()["error"]["message"]
    finally:
        front.shutdown()
