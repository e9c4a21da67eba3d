"""Adapters over HTTP: the real engine and server through the real `openai` client, on a tiny Qwen3."""

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from bench.make_model import build_tokenizer
from tests.adapters.peft_models import make_peft_adapter
from tests.tiny_models import make_hf_model
from hyprjax.adapters.registry import LoraRequest
from hyprjax.engine.async_engine import AsyncEngine
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.formats.load import load_model
from hyprjax.sampling import SamplingParams

V = 512
CHATML = (Path(__file__).parents[2] / "hyprjax" / "templates" / "chatml.jinja").read_text()
ECFG = dict(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_seqs=2, page_size=8, num_pages=256,
            max_model_len=256, block_q=8, max_queue=64, max_loras=3, max_lora_rank=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("served_lora")
    hf = make_hf_model(d / "base", "qwen3", vocab_size=V, eos_token_id=V - 1)
    build_tokenizer(V).save(str(d / "base" / "tokenizer.json"))
    (d / "base" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    lora_dir = d / "adapters"
    for i, name in enumerate(["support", "legal", "extra", "spare"]):
        make_peft_adapter(hf, lora_dir / name, seed=10 + i, r=8, alpha=16, magnitude=0.15)
    return dict(loaded=load_model(d / "base", progress=False), lora_dir=lora_dir, outside=d / "outside")


@pytest.fixture(scope="module")
def engine(world):
    from hyprjax.adapters.load import read_adapter

    loaded = world["loaded"]
    eng = LLMEngine(loaded.model, loaded.cfg, loaded.tokenizer, EngineConfig(**ECFG), progress=False)
    for name in ("support", "legal"):
        eng.add_adapter(read_adapter(world["lora_dir"] / name, name, loaded.cfg, 8))
    front = AsyncEngine(eng, "tiny")
    front.start()
    yield front
    front.shutdown()


@pytest.fixture
def url(make_server, engine, world):
    return make_server(engine, enable_adapter_admin=True, lora_paths=[str(world["lora_dir"] / "support"), str(world["lora_dir"] / "legal")],
                       lora_dir=str(world["lora_dir"]))


@pytest.fixture
def client(make_client, url):
    return make_client(url, timeout=120)


def _offline(world, prompt: str, max_tokens: int, lora: LoraRequest | None) -> str:
    """The same request through a fresh LLMEngine with the same adapters, outside the server."""
    from hyprjax.adapters.load import read_adapter

    loaded = world["loaded"]
    eng = LLMEngine(loaded.model, loaded.cfg, loaded.tokenizer, EngineConfig(**ECFG), warmup=False, progress=False)
    for name in ("support", "legal"):
        eng.add_adapter(read_adapter(world["lora_dir"] / name, name, loaded.cfg, 8))
    rid = eng.add_request(loaded.tokenizer.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                          lora=lora)
    text = ""
    while eng.has_unfinished():
        text += "".join(o.new_text for o in eng.step() if o.request_id == rid)
    return text


def test_models_lists_adapters_with_their_parent(client, world):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "support", "legal"}
    assert cards["support"].parent == "tiny" and cards["tiny"].parent is None
    assert cards["legal"].root == "legal"  # never the adapter's path on the server
    assert str(world["lora_dir"]) not in client.models.list().model_dump_json()
    card = cards["support"].model_dump()["adapter"]  # what it is: kind, density, bytes, values, rank
    from hyprjax.adapters.lora import module_shapes

    shapes, layers = module_shapes(world["loaded"].cfg).values(), world["loaded"].cfg.num_layers
    params = layers * sum(8 * (i + o) for i, o in shapes)  # rank 8 on all seven modules of every layer
    assert card["kind"] == "lora" and card["rank"] == 8 and card["params"] == params and card["bytes"] == 4 * params
    assert card["density"] == pytest.approx(params / (layers * sum(i * o for i, o in shapes)), rel=1e-5)


def test_adapter_by_model_name_mix_and_merge_equal_the_engine_offline(client, world):
    prompt = "The weather today"
    by_name = client.completions.create(model="support", prompt=prompt, max_tokens=10, temperature=0)
    assert by_name.model == "support"
    assert by_name.choices[0].text == _offline(world, prompt, 10, LoraRequest.make(["support"]))
    base = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
    assert base == _offline(world, prompt, 10, None) != by_name.choices[0].text
    mix = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, extra_body=dict(
        lora_adapters=["support", "legal"], lora_weights={"support": 0.7, "legal": 0.3}))
    assert mix.choices[0].text == _offline(world, prompt, 10, LoraRequest.make(["support", "legal"], [0.7, 0.3]))
    ties = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, extra_body=dict(
        lora_adapters=["support", "legal"], lora_combination_strategy="ties", lora_density=0.5))
    assert ties.choices[0].text == _offline(world, prompt, 10, LoraRequest.make(["support", "legal"],
                                                                                 strategy="ties", density=0.5))


def test_concurrent_streams_over_adapters_equal_each_alone(client, world):
    """Base, two adapters and a mix streamed together (one batch) equal the same requests alone."""
    kinds = [dict(model="tiny"), dict(model="support"), dict(model="legal"),
             dict(model="tiny", extra_body=dict(lora_adapters=["support", "legal"], lora_weights=[0.5, 0.5]))]

    def run(kind, prompt):
        s = client.completions.create(prompt=prompt, max_tokens=8, temperature=0, stream=True, **kind)
        return "".join(ch.choices[0].text for ch in s if ch.choices)

    jobs = [(k, f"story number {i}") for i, k in enumerate(kinds * 2)]
    results = [None] * len(jobs)
    threads = [threading.Thread(target=lambda i=i, j=j: results.__setitem__(i, run(*j))) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [run(*j) for j in jobs]


def test_hot_load_and_unload_while_streaming(client, url, world):
    http = httpx.Client(base_url=url, timeout=120)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"})  # inside --lora-dir
    assert r.status_code == 200, r.text
    assert "extra" in {m.id for m in client.models.list().data}
    stream = client.completions.create(model="extra", prompt="a long tale", max_tokens=230, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))  # running: it holds the adapter
    done = {}
    unloader = threading.Thread(target=lambda: done.setdefault("r", http.post("/v1/unload_lora_adapter",
                                                                             json={"lora_name": "extra"})))
    unloader.start()
    time.sleep(0.3)
    assert "extra" not in {m.id for m in client.models.list().data}  # refused to new requests at once
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="x", max_tokens=2)
    assert "r" not in done  # the unload waits for the stream still using the adapter
    chunks = [first] + list(stream)
    unloader.join(timeout=60)
    assert done["r"].status_code == 200
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) >= 10  # it ran to the end
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"})
    assert again.status_code == 200


@pytest.mark.parametrize("body, status, match", [
    ({"lora_name": "x", "lora_path": "/etc"}, 403, "not allowed"),
    ({"lora_name": "x", "lora_path": "../outside"}, 403, "not allowed"),
    ({"lora_name": "x", "lora_path": "missing"}, 400, "does not exist"),
    ({"lora_name": "support", "lora_path": "support"}, 400, "already loaded"),
    ({"lora_name": "tiny", "lora_path": "support"}, 400, "base model"),
    ({"lora_path": "support"}, 400, "lora_name"),
])
def test_bad_loads(url, body, status, match):
    r = httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60)
    assert r.status_code == status and match in r.json()["error"]["message"], r.text


def test_unknown_unload_is_404(url):
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "nope"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"


@pytest.mark.parametrize("extra, error, match", [
    (dict(lora_adapters=["nope"]), openai.NotFoundError, "not loaded"),
    (dict(lora_adapters=["support"], lora_combination_strategy="svd"), openai.BadRequestError, "must be one of"),
    (dict(lora_adapters=["support", "legal"], lora_combination_strategy="ties"), openai.BadRequestError,
     "needs lora_density"),
    (dict(lora_adapters=["support"], lora_density=1.5, lora_combination_strategy="ties"), openai.BadRequestError,
     "lora_density"),
    (dict(lora_adapters=["support", "legal"], lora_weights=[1.0]), openai.BadRequestError, "2 adapters"),
    (dict(lora_adapters=["support"], lora_weights={"legal": 1.0}), openai.BadRequestError, "not in"),
    (dict(lora_adapters=["support", "legal", "a", "b"]), openai.BadRequestError, "exceeds --max-loras 3"),
    (dict(lora_weights={"support": 1.0}), openai.BadRequestError, "needs 'lora_adapters'"),
    (dict(lora_adapters=[]), openai.BadRequestError, "non-empty"),
])
def test_bad_adapter_fields(client, extra, error, match):
    with pytest.raises(error, match=match):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body=extra)


def test_non_finite_weight_and_adapter_in_two_places(url, client):
    raw = '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "lora_adapters": ["support"], "lora_weights": [NaN]}'
    r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="one place"):
        client.completions.create(model="support", prompt="hi", max_tokens=2, extra_body={"lora_adapters": ["legal"]})


def test_metrics_per_adapter(client, url):
    client.completions.create(model="support", prompt="count me", max_tokens=2, temperature=0)
    client.completions.create(model="tiny", prompt="count me", max_tokens=2, temperature=0,
                              extra_body=dict(lora_adapters=["support", "legal"]))
    text = httpx.get(url + "/metrics").text
    assert 'hyprjax:lora_requests_total{lora_name="support",model_name="support"}' in text
    assert 'lora_name="legal+support"' in text
    assert "hyprjax:lora_request_latency_seconds_bucket" in text
    assert "hyprjax:lora_adapters_loaded" in text and "hyprjax:lora_evictions_total" in text


def test_adapter_admin_is_off_unless_enabled(make_server):
    from tests.serve.fake_engine import FakeEngine

    fake = FakeEngine()
    url = make_server(fake)
    for route, body in (("load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                        ("unload_lora_adapter", {"lora_name": "x"})):
        r = httpx.post(f"{url}/v1/{route}", json=body)
        assert r.status_code == 403 and "--enable-adapter-admin" in r.json()["error"]["message"]
    assert fake.lora == {}
