"""The OpenAI client against a live server on the fake engine: answers, streams, n, stop, logprobs, metrics."""

from __future__ import annotations

import dataclasses

import httpx
import openai
import pytest

from hyprjax.sampling import SamplingParams
from tests.serve.fake_engine import FakeEngine, FakeTokenizer, expected

USER = [{"role": "user", "content": "hi"}]


def chat_ids(messages) -> list[int]:
    tok = FakeTokenizer()
    return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


def want(ids, **params) -> tuple[str, str, int]:
    return expected(ids, SamplingParams(**params))


def test_models_list(make_server, make_client, fake):
    client = make_client(make_server(fake, served_model_names=["qwen", "qwen-alias"]))
    models = client.models.list()
    assert [m.id for m in models.data] == ["qwen", "qwen-alias"]
    card = models.data[0].model_dump()
    assert card["object"] == "model" and card["parent"] is None and card["root"] == "fake-model"
    assert card["max_model_len"] == fake.max_model_len


def test_chat(client, fake):
    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=12)
    ids = chat_ids(USER)
    text, reason, n = want(ids, max_tokens=12)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "fake-model"
    assert isinstance(r.created, int)
    [c] = r.choices
    assert (c.index, c.message.role, c.message.content, c.finish_reason, c.logprobs) == (0, "assistant", text, reason,
                                                                                        None)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    assert fake.calls[-1].prompt_ids == ids and fake.calls[-1].logprobs is None


def test_chat_defaults_fill_the_context_and_pass_template_kwargs(client, fake):
    client.chat.completions.create(model="fake-model", messages=USER,
                                   extra_body={"chat_template_kwargs": {"enable_thinking": False, "x": 1}})
    assert fake.calls[-1].params.max_tokens == fake.max_model_len - len(chat_ids(USER))
    assert fake.tokenizer.template_calls[-1] == {"enable_thinking": False, "tools": None, "x": 1}


def test_max_completion_tokens_wins_over_max_tokens(client, fake):
    client.chat.completions.create(model="fake-model", messages=USER, max_tokens=9, max_completion_tokens=4)
    assert fake.calls[-1].params.max_tokens == 4


def test_sampling_fields_reach_the_engine(client, fake):
    client.chat.completions.create(model="fake-model", messages=USER, max_tokens=5, temperature=0.5, top_p=0.9,
                                   presence_penalty=0.1, frequency_penalty=-0.2, seed=7, stop=["x", "yz"],
                                   extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
                                               "ignore_eos": True, "stop_token_ids": [5], "speculative": False},
                                   user="someone")
    p = fake.calls[-1].params
    assert p.ignore_eos is True and type(p.temperature) is float and type(p.top_k) is int
    assert dataclasses.asdict(p) == dataclasses.asdict(SamplingParams(
        max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.1, frequency_penalty=-0.2,
        repetition_penalty=1.1, seed=7, stop=("x", "yz"), stop_token_ids=(5,), ignore_eos=True, speculative=False))


def test_completion_forms(client, fake):
    tok = fake.tokenizer
    r = client.completions.create(model="fake-model", prompt="hello")
    text, reason, n = want(tok.encode("hello"), max_tokens=16)  # OpenAI's default for completions
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, reason, n)

    r = client.completions.create(model="fake-model", prompt=["ab", "abc"], max_tokens=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [want(tok.encode(p), max_tokens=7)[0] for p in ("ab", "abc")]
    assert r.usage.prompt_tokens == len(tok.encode("ab")) + len(tok.encode("abc"))
    assert r.usage.completion_tokens == 14

    r = client.completions.create(model="fake-model", prompt=[1, 2, 3], max_tokens=5)
    assert r.choices[0].text == want([1, 2, 3], max_tokens=5)[0] and fake.calls[-1].prompt_ids == [1, 2, 3]
    r = client.completions.create(model="fake-model", prompt=[[1, 2], [4]], max_tokens=5)
    assert [c.text for c in r.choices] == [want([1, 2], max_tokens=5)[0], want([4], max_tokens=5)[0]]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, fake, stream):
    ids = chat_ids(USER)
    full = want(ids, max_tokens=60)[0]
    stop = full.split()[2]  # the third word
    text, reason, n = want(ids, max_tokens=60, stop=(stop,))
    assert reason == "stop" and stop not in text and len(text) < len(full)
    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=60, stop=stop, stream=stream)
    if stream:
        chunks = list(r)
        deltas = [c.choices[0].delta.content or "" for c in chunks]
        assert "".join(deltas) == text and not any(stop in d for d in deltas)
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, "stop")
        assert r.usage.completion_tokens == n


def test_n_choices_are_separate_requests_with_seed_plus_i(client, fake):
    ids = chat_ids(USER)
    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=20, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [want(ids, max_tokens=20, seed=5 + i)[0] for i in range(3)]
    calls = fake.calls[-3:]
    assert len({c.request_id for c in calls}) == 3 and all(c.request_id.startswith(r.id) for c in calls)
    assert [c.params.seed for c in calls] == [5, 6, 7]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 60

    client.completions.create(model="fake-model", prompt="x", max_tokens=3, n=2)
    assert [c.params.seed for c in fake.calls[-2:]] == [None, None]


def test_chat_logprobs(client, fake):
    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=6, logprobs=True,
                                       top_logprobs=2)
    assert fake.calls[-1].logprobs == 2
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob == -0.5 and e.bytes == list(e.token.encode())
        assert [t.logprob for t in e.top_logprobs] == [-0.5, -1.5]
        assert e.top_logprobs[0].token == e.token

    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=3, logprobs=True)
    assert fake.calls[-1].logprobs == 0
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[], [], []]


def test_completion_logprobs(client, fake):
    r = client.completions.create(model="fake-model", prompt="hello", max_tokens=6, logprobs=3)
    assert fake.calls[-1].logprobs == 3
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.token_logprobs == [-0.5] * 6
    assert all(len(top) == 3 and top[tok] == -0.5 for top, tok in zip(lp.top_logprobs, lp.tokens))
    assert lp.text_offset == list(range(6))


def test_chat_stream_with_usage(client, fake):
    ids = chat_ids(USER)
    text, reason, n = want(ids, max_tokens=15)
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, max_tokens=15, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, finish, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.usage is None
    assert "".join(c.choices[0].delta.content for c in middle) == text
    assert all(c.choices[0].finish_reason is None for c in middle)
    assert finish.choices[0].finish_reason == reason and finish.choices[0].delta.content is None
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(ids), n)


def test_stream_raw_sse_and_no_usage_by_default(base_url, fake):
    body = {"model": "fake-model", "prompt": "hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    assert '"usage"' not in raw


def test_completion_stream_n_and_logprobs(client, fake):
    ids = fake.tokenizer.encode("hey")
    chunks = list(client.completions.create(model="fake-model", prompt="hey", max_tokens=9, n=2, seed=1,
                                            logprobs=1, stream=True, stream_options={"include_usage": True}))
    texts, offsets, reasons = {0: "", 1: ""}, {0: [], 1: []}, {}
    for c in chunks[:-1]:
        [ch] = c.choices
        texts[ch.index] += ch.text
        offsets[ch.index] += ch.logprobs.text_offset if ch.logprobs else []
        if ch.finish_reason:
            reasons[ch.index] = ch.finish_reason
    assert texts == {i: want(ids, max_tokens=9, seed=1 + i)[0] for i in (0, 1)}
    assert reasons == {0: "length", 1: "length"} and offsets == {0: list(range(9)), 1: list(range(9))}
    assert chunks[-1].usage.completion_tokens == 18 and chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_stream_logprobs_cover_every_token(client, fake):
    stream = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=8, logprobs=True,
                                            top_logprobs=1, stream=True)
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 8 and all(len(e.top_logprobs) == 1 for e in entries)


def test_multi_token_increments(make_server, make_client):
    engine = FakeEngine(chunk=4)
    client = make_client(make_server(engine))
    text = want(chat_ids(USER), max_tokens=10)[0]
    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=10, logprobs=True)
    assert r.choices[0].message.content == text and len(r.choices[0].logprobs.content) == 10
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, max_tokens=10, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_health_reports_loading_then_ready(make_server):
    engine = FakeEngine(ready=False)
    url = make_server(engine)
    assert httpx.get(url + "/health").status_code == 503
    engine.ready = True
    assert httpx.get(url + "/health").status_code == 200


def test_metrics_after_traffic(client, base_url, fake):
    client.chat.completions.create(model="fake-model", messages=USER, max_tokens=5)
    list(client.completions.create(model="fake-model", prompt="abc", max_tokens=4, stream=True))
    client.chat.completions.create(model="fake-model", messages=USER, max_tokens=50, stop="ipsum")
    r = httpx.get(base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    model = '{model_name="fake-model"}'
    assert samples[f"hyprjax:num_requests_running{model}"] == 0
    assert samples[f"hyprjax:num_requests_waiting{model}"] == 0
    assert samples[f"hyprjax:kv_cache_usage_perc{model}"] == 0
    assert samples[f"hyprjax:num_preemptions_total{model}"] == 3
    assert samples[f"hyprjax:prompt_tokens_total{model}"] == 2 * len(chat_ids(USER)) + 4
    assert samples[f"hyprjax:generation_tokens_total{model}"] == 5 + 4 + want(chat_ids(USER), max_tokens=50,
                                                                            stop=("ipsum",))[2]
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert samples[f"hyprjax:{h}_count{model}"] == 3
    assert samples[f"hyprjax:inter_token_latency_seconds_count{model}"] == samples[
        f"hyprjax:generation_tokens_total{model}"] - 3
    assert samples['hyprjax:request_success_total{finished_reason="length",model_name="fake-model"}'] == 2
    assert samples['hyprjax:request_success_total{finished_reason="stop",model_name="fake-model"}'] == 1


def test_api_key(make_server, make_client, fake):
    url = make_server(fake, api_key="sesame")
    with pytest.raises(openai.AuthenticationError) as e:
        make_client(url, api_key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "sesame"}, {"Authorization": "Basic sesame"}):
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        assert r.headers["www-authenticate"] == "Bearer"
    ok = make_client(url, api_key="sesame")
    assert ok.chat.completions.create(model="fake-model", messages=USER, max_tokens=2).choices[0].message.content
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
    # /metrics needs the key too, unless the server was started with --public-metrics
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer sesame"}).status_code == 200
    public = make_server(fake, api_key="sesame", public_metrics=True)
    assert httpx.get(public + "/metrics").status_code == 200


def test_request_body_limit_is_413_in_openai_shape(make_server, fake):
    url = make_server(fake, max_request_bytes=2000)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "over this server's limit of 2,000" in err["message"]

    def chunks():  # no Content-Length: the read itself stops at the limit
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "more than 2,000 bytes" in r.json()["error"]["message"]
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_caps_on_prompts_and_stop_strings(client, base_url):
    r = httpx.post(base_url + "/v1/completions", json={"prompt": ["a"] * 129, "max_tokens": 1})
    assert r.status_code == 400 and "at most 128 are allowed" in r.json()["error"]["message"]
    r = httpx.post(base_url + "/v1/completions", json={"prompt": ["a"] * 64, "n": 4, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": USER, "stop": ["s"] * 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": USER, "stop": ["s" * 1001]})
    assert r.status_code == 400 and "1001 characters" in r.json()["error"]["message"]


def test_real_tokenizer_chat_template_and_kwargs(tmp_path, make_server, make_client):
    """The handlers against hyprjax's own Tokenizer (a word-level vocab with Qwen3's template)."""
    import json
    from pathlib import Path

    from tokenizers import AddedToken, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from hyprjax.tokenizer import Tokenizer

    words = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "user", "assistant",
             "hello", "world"]
    backend = Backend(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in words[:6]])
    backend.save(str(tmp_path / "tokenizer.json"))
    template = (Path(__file__).parents[1] / "data" / "qwen3_chat_template.jinja").read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    engine = FakeEngine(tokenizer=tok)
    client = make_client(make_server(engine))
    messages = [{"role": "user", "content": "hello world"}]
    for thinking in (False, True):
        r = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=3,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
        want_ids = tok.encode(tok.apply_chat_template(messages, enable_thinking=thinking), add_special_tokens=False)
        assert engine.calls[-1].prompt_ids == want_ids and r.usage.prompt_tokens == len(want_ids)
    assert len(engine.calls[-2].prompt_ids) > len(engine.calls[-1].prompt_ids)  # the empty think block
    r = client.completions.create(model="fake-model", prompt=[2, 8, 9, 3], max_tokens=2, logprobs=1)
    assert engine.calls[-1].prompt_ids == [2, 8, 9, 3]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fake-model", prompt=[10], max_tokens=2)
    assert "outside the vocabulary [0, 10)" in str(e.value)
