"""Errors in OpenAI's shape, and aborts: a refused or abandoned request never stays in the engine."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.serve.fake_engine import FakeEngine

USER = [{"role": "user", "content": "hi"}]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_malformed_json_and_non_object_bodies(base_url):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(base_url + path, content=b'{"messages": [', headers={"Content-Type": "application/json"})
        assert error_of(r, 400)["type"] == "invalid_request_error"
        assert "not valid JSON" in r.json()["error"]["message"]
        error_of(httpx.post(base_url + path, json=[1, 2]), 400)


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "messages", "hi"),
    ("/v1/chat/completions", "messages", []),
    ("/v1/chat/completions", "messages[0]", None),  # a message that is not an object
    ("/v1/chat/completions", "temperature", "hot"),
    ("/v1/chat/completions", "max_tokens", 1.5),
    ("/v1/chat/completions", "max_completion_tokens", "8"),
    ("/v1/chat/completions", "n", "2"),
    ("/v1/chat/completions", "stop", 5),
    ("/v1/chat/completions", "stop", ["a", 1]),
    ("/v1/chat/completions", "seed", True),
    ("/v1/chat/completions", "logprobs", 1),
    ("/v1/chat/completions", "top_logprobs", "3"),
    ("/v1/chat/completions", "stream", "yes"),
    ("/v1/chat/completions", "model", 7),
    ("/v1/chat/completions", "chat_template_kwargs", ["enable_thinking"]),
    ("/v1/chat/completions", "top_k", 2.5),
    ("/v1/completions", "prompt", 42),
    ("/v1/completions", "prompt", [[1, 2], "x"]),
    ("/v1/completions", "prompt", []),
    ("/v1/completions", "logprobs", True),
    ("/v1/completions", "user", 3),
])
def test_wrong_types_name_the_field(base_url, path, field, value):
    body = {"model": "fake-model", "max_tokens": 4}
    body.update({"messages": USER} if "chat" in path else {"prompt": "x"})
    if field == "messages[0]":
        body["messages"] = [USER[0], "not a message"]
        field = "messages[1]"
    else:
        body[field] = value
    err = error_of(httpx.post(base_url + path, json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == field


@pytest.mark.parametrize("field, value", [("top_p", 2.0), ("temperature", -1), ("presence_penalty", 3),
                                          ("top_logprobs", 21), ("n", 0), ("max_tokens", 0), ("min_p", 1.5)])
def test_out_of_range_values_name_the_field(base_url, field, value):
    body = {"model": "fake-model", "messages": USER, "logprobs": True, field: value}
    err = error_of(httpx.post(base_url + "/v1/chat/completions", json=body), 400)
    assert err["param"] == field and str(value) in err["message"]


def test_completion_logprobs_limit_and_bad_token_ids(base_url):
    err = error_of(httpx.post(base_url + "/v1/completions", json={"prompt": "x", "logprobs": 6}), 400)
    assert err["param"] == "logprobs"
    err = error_of(httpx.post(base_url + "/v1/completions", json={"prompt": [1, 9999]}), 400)
    assert err["param"] == "prompt" and "9999" in err["message"]
    err = error_of(httpx.post(base_url + "/v1/completions", json={"prompt": [-1]}), 400)
    assert err["param"] == "prompt"


def test_unknown_fields_are_ignored_unsupported_ones_refused(base_url):
    r = httpx.post(base_url + "/v1/chat/completions",
                   json={"messages": USER, "max_tokens": 2, "foo": {"bar": 1}, "service_tier": "auto"})
    assert r.status_code == 200 and r.json()["model"] == "fake-model"  # model defaults to the served name
    err = error_of(httpx.post(base_url + "/v1/completions", json={"prompt": "x", "echo": True}), 400)
    assert err["param"] == "echo"
    err = error_of(httpx.post(base_url + "/v1/chat/completions",
                              json={"messages": USER, "response_format": {"type": "json_object"}}), 400)
    assert err["param"] == "response_format"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    err = error_of(httpx.post(base_url + "/v1/chat/completions", json={"messages": image}), 400)
    assert err["param"] == "messages[0].content"
    err = error_of(httpx.post(base_url + "/v1/chat/completions",
                              json={"messages": USER, "stream_options": {"include_usage": True}}), 400)
    assert err["param"] == "stream_options"


def test_text_parts_are_joined(base_url, fake):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert httpx.post(base_url + "/v1/chat/completions", json={"messages": parts, "max_tokens": 1}).status_code == 200
    assert bytes(fake.calls[-1].prompt_ids).decode() == "<|user|>a\nb\n<|assistant|>"


def test_unknown_model_is_404(client, base_url):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "gpt-9" in e.value.body["message"]
    assert error_of(httpx.get(base_url + "/v1/nothing-here"), 404)["type"] == "invalid_request_error"
    assert error_of(httpx.get(base_url + "/v1/completions"), 405)


def test_too_long_names_the_numbers(client, fake):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake-model", messages=USER, max_tokens=1000)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert "256" in body["message"] and "1000" in body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fake-model", prompt="x" * 300)
    assert "256" in e.value.body["message"] and "301" in e.value.body["message"]
    assert fake.calls == []


@pytest.mark.parametrize("lazy", [False, True])
def test_engine_prompt_too_long_is_400(make_server, make_client, lazy):
    engine = FakeEngine(prompt_limit=3, lazy_errors=lazy)
    client = make_client(make_server(engine))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fake-model", prompt="hello")
    assert "limit of 3" in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_503_with_retry_after(make_server, make_client, lazy, stream):
    engine = FakeEngine(max_running=0, lazy_errors=lazy)
    url = make_server(engine)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "stream": stream})
    assert error_of(r, 503)["type"] == "server_error" and r.headers["retry-after"] == "1"
    with pytest.raises(openai.APIStatusError) as e:
        make_client(url).completions.create(model="fake-model", prompt="x", stream=stream)
    assert e.value.status_code == 503 and "queue is full" in e.value.message


@pytest.mark.parametrize("lazy", [False, True])
def test_a_refused_choice_aborts_its_admitted_siblings(make_server, lazy):
    engine = FakeEngine(max_running=2, delay=0.01, lazy_errors=lazy)
    url = make_server(engine)
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 3, "max_tokens": 100})
    assert r.status_code == 503
    wait_until(lambda: not engine.running)
    # eager: admitted at the call and never read, so only engine.abort() can drop them
    assert len(engine.aborted) == 2 and engine.finished == []


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", {"messages": USER}),
                                        ("/v1/completions", {"prompt": "x", "n": 2})])
def test_client_disconnect_mid_stream_aborts(make_server, path, body):
    engine = FakeEngine(delay=0.02)
    url = make_server(engine)
    with httpx.stream("POST", url + path, json={**body, "max_tokens": 200, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or line == "" for line in got)
    wait_until(lambda: not engine.running)
    n = body.get("n", 1)
    assert len(engine.aborted) == n and engine.finished == []
    assert len({c.request_id for c in engine.calls}) == n


def test_client_disconnect_while_waiting_aborts(make_server):
    engine = FakeEngine(delay=0.02)
    url = make_server(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 200}, timeout=0.3)
    wait_until(lambda: not engine.running)
    assert len(engine.aborted) == 1 and engine.finished == []
    metrics = httpx.get(url + "/metrics").text
    assert 'hyprjax:request_success_total{finished_reason="abort",model_name="fake-model"} 1.0' in metrics


def test_engine_failure_is_500_or_an_in_band_error(make_server, make_client):
    engine = FakeEngine(fail_after=3)
    url = make_server(engine)
    err = error_of(httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 9}), 500)
    assert err["type"] == "server_error" and "Traceback" not in err["message"]
    stream = make_client(url).chat.completions.create(model="fake-model", messages=USER, max_tokens=9, stream=True)
    with pytest.raises(openai.APIError) as e:
        list(stream)
    assert "failed" in e.value.message
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "x", "max_tokens": 9, "stream": True}) as r:
        events = r.read().decode().split("\n\n")
    assert '"error"' in events[-3] and events[-2] == "data: [DONE]"
    assert not engine.running
