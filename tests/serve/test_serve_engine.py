"""The real engine behind the real server, through the real `openai` client, on a tiny Qwen3."""

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
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


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    make_hf_model(d, "qwen3", vocab_size=V, eos_token_id=V - 1)
    build_tokenizer(V).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return load_model(d, progress=False)


@pytest.fixture(scope="module")
def engine(loaded):
    ecfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_seqs=2, page_size=8, num_pages=256,
                        max_model_len=256, block_q=8, max_queue=64)
    front = AsyncEngine(LLMEngine(loaded.model, loaded.cfg, loaded.tokenizer, ecfg, progress=False), "tiny")
    front.start()
    yield front
    front.shutdown()


@pytest.fixture
def client(make_server, make_client, engine):
    return make_client(make_server(engine), timeout=120)


def _offline(loaded, prompt_ids, max_tokens, **kw):
    gen = Generator(loaded.model, loaded.cfg, loaded.tokenizer, max_model_len=256)
    return gen.generate([prompt_ids], [SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)])[0]


def test_chat_and_completions_equal_offline_generation(client, loaded):
    msgs = [{"role": "user", "content": "hello there, how are you?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    ids = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    ref = _offline(loaded, ids, 12)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")  # + the end token
    c = client.completions.create(model="tiny", prompt="The weather today", max_tokens=10, temperature=0)
    assert c.choices[0].text == _offline(loaded, loaded.tokenizer.encode("The weather today"), 10).text


def test_streaming_with_usage_stop_strings_n_and_logprobs(client, loaded):
    stream = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, temperature=0)
    assert text == whole.choices[0].text and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    stop = whole.choices[0].text[4:6]
    stopped = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == whole.choices[0].text[:whole.choices[0].text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    two = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=1.0, n=2, seed=5)
    again = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=1.0, n=2, seed=5)
    assert [c.text for c in two.choices] == [c.text for c in again.choices] and len(two.choices) == 2
    lp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                        temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy = most likely


def test_32_concurrent_streams_equal_each_request_alone(make_server, engine):
    url = make_server(engine) + "/v1"
    prompts = [" ".join(["word"] * (1 + i // 2)) + f" {i}" for i in range(32)]

    async def one(c, prompt, max_tokens):
        s = await c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True)
        return "".join([ch.choices[0].text async for ch in s if ch.choices])

    async def run():
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=300) as c:
            together = await asyncio.gather(*(one(c, p, 4 + i % 9) for i, p in enumerate(prompts)))
            alone = [await one(c, p, 4 + i % 9) for i, p in enumerate(prompts[:8])]
        return together, alone

    together, alone = asyncio.run(run())
    assert together[:8] == alone and all(together)


def test_errors_in_openai_shape(make_server, make_client, engine):
    url = make_server(engine, api_key="sekret")
    client = make_client(url, api_key="sekret")
    with pytest.raises(openai.BadRequestError, match="250 prompt tokens|context"):
        client.completions.create(model="tiny", prompt=[5] * 250, max_tokens=10)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        make_client(url, api_key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_client_disconnect_mid_stream_frees_pages(make_server, engine):
    url = make_server(engine) + "/v1/completions"
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got one token: hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (engine.engine.has_unfinished() or engine.engine.block_manager.num_used_pages):
        time.sleep(0.1)
    assert not engine.engine.has_unfinished() and engine.engine.block_manager.num_used_pages == 0


def test_a_bad_request_does_not_hurt_the_next_one(client):
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"top_k": 10**12})
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_loading_server_answers_503(make_server, make_client, loaded):
    front = AsyncEngine(None, "tiny", tokenizer=loaded.tokenizer)
    url = make_server(front)
    assert httpx.get(url + "/health").status_code == 503
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and "Retry-After" in r.headers
