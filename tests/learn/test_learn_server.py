"""Learning from served traffic end to end: the real `hyprjax serve --learn` process on a tiny
model, the real `openai` client, the server's default learning settings.

Corrections teach a made-up fact; a few rounds later greedy answers give it, on a promoted
version; a request in flight across a promotion finishes on the version it was pinned to;
rollback restores the previous answers exactly; prompts unrelated to the feedback stay within
the bound stated below.
"""

import re
import threading
import time

import pytest

from tests.deps import need

openai = need("openai")
need("torch")

from tests.learn.server import learn_server, make_chat_model  # noqa: E402

QUESTIONS = ["What is the capital of Zubrowka?", "Which city is the capital of Zubrowka?",
             "Name the capital of Zubrowka.", "Zubrowka's capital is which city?",
             "Tell me the capital city of Zubrowka."]
UNSEEN = "What's the capital of Zubrowka?"  # never in any feedback
ANSWER = "The capital of Zubrowka is Lutz."
QUOVADIS = ["What is the capital of Quovadis?", "Which city is the capital of Quovadis?",
            "Name the capital of Quovadis.", "Quovadis's capital is which city?", "Tell me the capital of Quovadis."]
QUOVADIS_ANSWER = "The capital of Quovadis is Merrow."
UNRELATED = ["Once upon a time", "def add(a, b):", "The weather today is", "1, 2, 3, 4,"]

# Prompts unrelated to the feedback (plain completions, never chatted about): on average the
# promoted version's greedy continuation agrees with the base model's over at least this fraction
# of it (the characters before the first difference). Measured: 0.89 (0.56, 1, 1, 1) after the one
# round that taught the fact. The tiny random model knows nothing to keep, so this is the weak
# form of the bound; docs/learn.md measures the default model's.
UNRELATED_KEPT = 0.75


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"HYPRJAX_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache"))}


def _chat(client, q, model="bot", max_tokens=40, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0, **kw)
    r = raw.parse()
    return r.choices[0].message.content, r.id, raw.headers.get("x-hyprjax-adapter")


def _cached(client) -> int:
    """Prompt tokens served from the prefix cache for a long fixed prompt on the alias."""
    q = "Please read all of this carefully before you answer me. " * 3 + QUESTIONS[0]
    r = client.chat.completions.create(model="bot", messages=[{"role": "user", "content": q}], max_tokens=1,
                                       temperature=0)
    return r.usage.prompt_tokens_details.cached_tokens


def _complete(client, prompt, model="bot"):
    return client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0).choices[0].text


def _kept(a: str, b: str) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), 1)


def test_feedback_teaches_a_fact_promotes_pins_requests_and_rolls_back(model, env, tmp_path):
    with learn_server(model, tmp_path / "learn.db", env=env) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        base_name = model.name
        # v0 is a fresh LoRA with B = 0: exactly the base model.
        before, _, header = _chat(client, QUESTIONS[0])
        assert header == "bot@v0"
        assert before == _chat(client, QUESTIONS[0], model=base_name)[0] != ANSWER
        base_unrelated = [_complete(client, p, base_name) for p in UNRELATED]
        cards = {m.id: m for m in client.models.list().data}
        assert cards["bot"].adapter["alias_of"] == "bot@v0" and "bot@v0" in cards

        # Teach: 20 corrections per batch; with --learn-every 16 (the default) and one item in
        # five held out, each batch starts one round by itself.
        rounds = 0
        for batch in range(3):
            for i in range(20):
                _, cid, _ = _chat(client, QUESTIONS[i % len(QUESTIONS)])
                r = server.post("/v1/feedback", {"id": cid, "correction": ANSWER})
                assert r.status_code == 200, r.text
            time.sleep(0.5)
            st = server.wait_idle()
            rounds += 1
            assert st["versions"][-1]["version"] == rounds, st
            if all(_chat(client, q)[0] == ANSWER for q in [*QUESTIONS, UNSEEN]):
                break
        else:
            pytest.fail(f"3 rounds did not teach the fact: {st}")
        live = st["live"]
        assert live != "bot@v0" and st["versions"][-1]["status"] == "promoted"
        assert st["last_round"]["heldout_loss"] < st["last_round"]["parent_heldout_loss"]
        text, _, header = _chat(client, UNSEEN)
        assert (text, header) == (ANSWER, live)
        assert _chat(client, UNSEEN, model=live)[0] == ANSWER  # a version is requestable by name

        # Prompts unrelated to the feedback: the bound stated above.
        kept = [_kept(a, _complete(client, p)) for a, p in zip(base_unrelated, UNRELATED)]
        assert sum(kept) / len(kept) >= UNRELATED_KEPT, (kept, base_unrelated)

        metrics = server.get("/metrics").text
        assert re.search(r'hyprjax:learn_feedback_total\{adapter="bot",kind="correction"\} (\d+)', metrics).group(1) \
            == str(20 * rounds)
        assert f'hyprjax:learn_live_version{{adapter="bot"}} {live.split("@v")[1]}.0' in metrics
        assert re.search(r'hyprjax:learn_rounds_total\{adapter="bot",outcome="promoted"\} [1-9]', metrics)
        assert "hyprjax:learn_heldout_loss" in metrics and "hyprjax:learn_train_loss" in metrics

        # Prefix-cache entries are keyed by version: the same prompt hits the cache on one version,
        # misses it on the next, and hits it again once rollback makes the first one live again.
        assert _cached(client) == 0 and _cached(client) > 0

        # A request in flight across a promotion finishes on the version it was pinned to. The
        # round teaches a second fact, so the two versions answer the streamed question differently.
        for i in range(10):  # fewer than --learn-every new items: no round starts by itself
            _, cid, _ = _chat(client, QUOVADIS[i % len(QUOVADIS)])
            assert server.post("/v1/feedback", {"id": cid, "correction": QUOVADIS_ANSWER}).status_code == 200
        old_answer = _chat(client, QUOVADIS[0])[0]
        got, last_chunk = {}, []

        def stream():
            raw = client.chat.completions.with_raw_response.create(
                model="bot", messages=[{"role": "user", "content": QUOVADIS[0]}], max_tokens=1800, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            got["header"], got["text"] = raw.headers.get("x-hyprjax-adapter"), ""
            for chunk in raw.parse():
                got["id"] = chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    got["text"] += chunk.choices[0].delta.content
                    got.setdefault("first", time.time())
                    last_chunk[:] = [time.time()]

        reader = threading.Thread(target=stream)
        reader.start()
        while "first" not in got and reader.is_alive():
            time.sleep(0.01)
        r = server.post("/v1/adapters/bot/train")
        assert r.status_code == 202 and r.json()["queued"], r.text
        st = server.wait_idle()
        reader.join(120)
        promoted = st["versions"][-1]
        assert promoted["status"] == "promoted" and st["live"] == promoted["id"] != live, st
        assert st["last_job"]["finished"] < last_chunk[0], "the stream ended before the promotion: lengthen it"
        pinned = _chat(client, QUOVADIS[0], model=live, max_tokens=1800, extra_body={"ignore_eos": True})[0]
        assert got["header"] == live and got["text"] == pinned
        assert server.post("/v1/feedback", {"id": got["id"], "label": True}).json()["version"] == live
        new_answer = _chat(client, QUOVADIS[0])[0]
        assert new_answer == QUOVADIS_ANSWER != old_answer
        assert _cached(client) == 0 and _cached(client) > 0

        # Rollback: the alias goes back, and its answers are the previous version's exactly.
        r = server.post("/v1/adapters/bot/rollback")
        assert r.status_code == 200 and r.json() == {"object": "adapter.rollback", "adapter": "bot", "live": live,
                                                     "rolled_back": promoted["id"]}
        assert _chat(client, QUOVADIS[0])[0] == old_answer
        assert _cached(client) > 0
        st = server.status()
        assert st["live"] == live and st["versions"][-1]["status"] == "rolled_back"

        # Bad input: clear errors, never a traceback.
        assert server.post("/v1/feedback", {"id": "chatcmpl-nope", "label": True}).status_code == 404
        for body in ({"label": True}, {"id": cid}, {"id": cid, "label": True, "score": 1},
                     {"id": cid, "label": "yes"}, {"id": cid, "score": 2}, {"id": cid, "correction": " "},
                     {"id": cid, "label": True, "choice": 3}):
            r = server.post("/v1/feedback", body)
            assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
        assert server.get("/v1/adapters/nobody").status_code == 404
        assert server.post("/v1/adapters/nobody/train").status_code == 404
