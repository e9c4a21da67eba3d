"""Killing `hyprjax serve --learn` (SIGKILL: nothing gets to clean up) at every point of a round
loses no interaction, no feedback and no promoted version, and never shows half a version."""

import time

from tests.deps import need

openai = need("openai")
need("torch")

from hyprjax.learn.versions import FAULT_VAR  # noqa: E402
from tests.learn.server import learn_server, make_chat_model  # noqa: E402

ANSWER = "The capital of Zubrowka is Lutz."
MANUAL = ("--learn-every", "1000")  # rounds start only when asked


def _teach(server, n, answer=lambda i: ANSWER):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    for i in range(n):
        r = client.chat.completions.create(model="bot", messages=[{"role": "user", "content": f"Capital of Zubrowka {i}?"}],
                                           max_tokens=4, temperature=0)
        assert server.post("/v1/feedback", {"id": r.id, "correction": answer(i)}).status_code == 200
    return client


def _answer(client, model):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Capital of Zubrowka?"}],
                                          max_tokens=40, temperature=0).choices[0].message.content


def _durable(st):
    """What must survive a kill: versions (id, status), the alias, the feedback counts."""
    return [(v["id"], v["status"]) for v in st["versions"]], st["live"], st["feedback"]


def test_kills_mid_round_mid_write_and_before_commit_lose_nothing(tmp_path_factory):
    model = make_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    env = {"HYPRJAX_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache"))}
    db = tmp_path_factory.mktemp("learn") / "learn.db"

    # 1. A promoted version, then a kill.
    with learn_server(model, db, *MANUAL, "--learn-steps", "8", env=env) as server:
        client = _teach(server, 10)
        assert server.post("/v1/adapters/bot/train").status_code == 202
        st = server.wait_idle()
        assert st["live"] == "bot@v1", st
        v1_answer = _answer(client, "bot")
        server.kill()
    kept = _durable(st)

    # 2. After the restart all of it is there; a long round is killed while it trains.
    with learn_server(model, db, *MANUAL, "--learn-steps", "100000", env=env) as server:
        assert _durable(server.status()) == kept
        client = _teach(server, 6, answer=lambda i: f"Random answer {i * 7919 % 1000}.")  # never all reproduced
        kept = _durable(server.status())
        assert server.post("/v1/adapters/bot/train").status_code == 202
        deadline = time.monotonic() + 120
        while server.status()["training"].get("step", 0) < 1:  # the round has begun its optimizer steps
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.02)
        server.kill()

    # 3. Killed with the version's files half written; 4. renamed but not committed.
    for point in ("mid-write", "before-commit"):
        with learn_server(model, db, *MANUAL, "--learn-steps", "2", env={**env, FAULT_VAR: point}) as server:
            assert _durable(server.status()) == kept
            assert server.post("/v1/adapters/bot/train").status_code == 202
            assert server.proc.wait(120) == -9, server.tail()

    # 5. Nothing half-done is visible or left on disk; the promoted version answers as before.
    with learn_server(model, db, *MANUAL, env=env, log_name="restarted.log") as server:
        st = server.status()
        assert _durable(st) == kept and st["training"]["state"] == "idle"
        assert sorted(p.name for p in (db.parent / "learn.db.versions" / "bot").iterdir()) == ["v0", "v1"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert _answer(client, "bot") == _answer(client, "bot@v1") == v1_answer
        assert "v3: a version a killed process never finished" in server.log.read_text()
        # And a round still works. Its version is v4: the killed rounds took v2 and v3 (numbers
        # are never handed out twice, so no name ever meant two sets of weights).
        assert server.post("/v1/adapters/bot/train").status_code == 202
        assert server.wait_idle()["versions"][-1]["id"] == "bot@v4"
