"""Data-parallel replicas behind one router (hyprjax/engine/replicas.py): the real HTTP server in
front of two fake engines, and two real engines on forced host devices (in a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from hyprjax.engine.replicas import Replicas
from hyprjax.sampling import SamplingParams
from tests.serve.fake_engine import FakeEngine, expected

ROOT = Path(__file__).parents[2]


@pytest.fixture
def pair():
    return [FakeEngine(delay=0.01), FakeEngine(delay=0.01)]


def test_requests_spread_over_replicas_and_answer_as_one_engine(make_server, make_client, pair):
    client = make_client(make_server(Replicas(pair, "fake-model")))
    prompts = [f"prompt number {i}" for i in range(8)]
    results = {}

    def ask(p):
        r = client.completions.create(model="fake-model", prompt=p, max_tokens=12, seed=1)
        results[p] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tok = pair[0].tokenizer
    for p in prompts:
        assert results[p] == expected(tok.encode(p), SamplingParams(max_tokens=12, seed=1))[0]
    assert len(pair[0].calls) >= 2 and len(pair[1].calls) >= 2  # both served
    assert len(pair[0].calls) + len(pair[1].calls) == len(prompts)


def test_least_loaded_routing_and_aborts_reach_the_right_replica(pair):
    router = Replicas(pair, "fake-model")

    async def run():
        a = router.generate([1, 2, 3], SamplingParams(max_tokens=50), request_id="a")
        b = router.generate([1, 2, 3], SamplingParams(max_tokens=50), request_id="b")
        assert (router.replica_of("a"), router.replica_of("b")) == (0, 1)
        await a.__anext__()
        await b.__anext__()
        router.abort("b")
        rest = [x async for x in b]
        assert rest[-1].finish_reason == "abort"
        c = router.generate([4], SamplingParams(max_tokens=5), request_id="c")  # replica 1 is free again
        assert router.replica_of("c") == 1
        assert [x async for x in c][-1].finished
        await a.aclose()  # a client that goes away mid-stream: the replica aborts it
        assert router.replica_of("a") is None

    asyncio.run(run())
    assert "b" in pair[1].aborted and "a" in pair[0].aborted and not pair[1].aborted[1:]
    stats = router.stats()
    assert stats["replicas"] == 2 and stats["num_preemptions_total"] == 6 and stats["prefix_cache_hit_rate"] == 0.25


def test_adapters_load_everywhere_or_nowhere(pair):
    router = Replicas(pair, "fake-model")
    asyncio.run(router.load_adapter("support", "/adapters/support"))
    assert pair[0].adapters() == pair[1].adapters() == {"support": "/adapters/support"}
    pair[1].lora["legal"] = "/elsewhere"  # the second replica refuses a name it already has
    with pytest.raises(Exception, match="already loaded"):
        asyncio.run(router.load_adapter("legal", "/adapters/legal"))
    assert "legal" not in pair[0].adapters()
    asyncio.run(router.unload_adapter("support"))
    assert "support" not in pair[0].adapters() and "support" not in pair[1].adapters()


def test_one_dead_replica_makes_health_fail(make_server, pair):
    url = make_server(Replicas(pair, "fake-model"))
    assert httpx.get(url + "/health").status_code == 200
    pair[1].dead_reason = "a step failed after donating the cache"
    r = httpx.get(url + "/health")
    assert r.status_code == 500 and "replica 1" in r.text


@pytest.mark.slow
def test_real_replicas_give_one_engines_tokens(tmp_path):
    """Two replicas (one device each, then two tensor-parallel devices each) over 4 forced host
    devices: greedy tokens of concurrent requests equal one engine's, and both replicas serve."""
    out = tmp_path / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.serve.replicas_worker", str(tmp_path), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    for layout in ("dp2", "dp2-tp2"):
        assert got[layout]["tokens"] == got["one"]["tokens"], layout
        assert sorted(set(got[layout]["replicas"])) == [0, 1], layout
