"""Real engines as replicas on forced host devices; run by tests/serve/test_replicas.py. Usage:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.serve.replicas_worker TMP OUT.json

Serves 6 concurrent greedy requests from one engine, from 2 one-device replicas and from 2
replicas of 2 tensor-parallel devices each, and writes each layout's tokens and the replica
each request ran on.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from hyprjax.engine.async_engine import AsyncEngine
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.llm_engine import LLMEngine
from hyprjax.engine.replicas import Replicas, replica_meshes, replica_models
from hyprjax.formats.load import load_model
from hyprjax.sampling import SamplingParams
from tests.tiny_models import make_hf_model

PROMPTS = [[5 + i, 9, 30 + 2 * i, 7, 11 + i] * (1 + i % 3) for i in range(6)]


def serve(loaded, dp: int, tp: int) -> dict:
    meshes = replica_meshes(dp, tp)
    ecfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, num_pages=64)
    fronts = []
    for mesh, model in zip(meshes, replica_models(loaded.model, loaded.cfg, meshes)):
        fronts.append(AsyncEngine(LLMEngine(model, loaded.cfg, None, ecfg, mesh=mesh), "tiny"))
    router = Replicas(fronts, "tiny")
    router.start()

    async def one(i, ids):
        stream = router.generate(ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                                 request_id=f"r{i}")
        where = router.replica_of(f"r{i}")
        tokens = [t async for out in stream for t in out.new_token_ids]
        return tokens, where

    async def run():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    try:
        results = asyncio.run(run())
    finally:
        router.shutdown()
    return {"tokens": [t for t, _ in results], "replicas": [w for _, w in results]}


def main(tmp: str, out: str) -> None:
    make_hf_model(Path(tmp) / "model", "qwen3", num_key_value_heads=2)
    loaded = load_model(Path(tmp) / "model", dtype="float32", progress=False, with_tokenizer=False)
    got = {"one": serve(loaded, 1, 1), "dp2": serve(loaded, 2, 1), "dp2-tp2": serve(loaded, 2, 2)}
    Path(out).write_text(json.dumps(got))


if __name__ == "__main__":
    main(*sys.argv[1:])
