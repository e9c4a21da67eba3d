"""One of two processes of a multi-host tensor-parallel check, run by tests/test_tensor_parallel.py.

    python -m tests.tp_multihost_worker MODEL_DIR PORT PROCESS_ID OUT.json

Each process has 2 forced host devices (XLA_FLAGS, set by the test); `jax.distributed.initialize`
joins them into one 4-device runtime (coordinator 127.0.0.1:PORT, CPU collectives over gloo).
Both load the same model, run the forward on their own first device (the one-device reference),
then over the global 4-device mesh with weights placed by `shard_params` (each process builds
only its shards), and through the engine (`LLMEngine(mesh=...)`, the same requests in both
processes, SPMD). Writes max differences and tokens as JSON.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax

if hasattr(jax.config, "jax_cpu_collectives_implementation"):  # gloo is the default in JAX 0.10
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(model_dir: str, port: int, process_id: int, out: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               local_device_ids=None, initialization_timeout=120)
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from hyprjax.engine.config import EngineConfig
    from hyprjax.engine.llm_engine import LLMEngine
    from hyprjax.formats.load import load_model
    from hyprjax.sampling import SamplingParams
    from hyprjax.sharding import make_mesh, shard_params

    result = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                  global_devices=jax.device_count(), local_devices=jax.local_device_count())
    local = jax.local_devices()[0]
    lm = load_model(model_dir, with_tokenizer=False, progress=False)  # on this process's devices
    graphdef, state = nnx.split(lm.model)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, lm.cfg.vocab_size, (2, 11)).astype(np.int32)
    positions = np.stack([np.arange(11), np.r_[np.arange(8), -1, -1, -1]]).astype(np.int32)
    forward = lambda state, t, p: nnx.merge(graphdef, state)(t, p)[0]  # noqa: E731
    one = np.asarray(jax.jit(forward)(state, jax.device_put(tokens, local), jax.device_put(positions, local)))

    mesh = make_mesh(jax.device_count())
    sharded = shard_params(state, lm.cfg, mesh)
    result["embed_sharding"] = str(sharded["embed"]["embedding"][...].sharding.spec)
    result["fully_addressable"] = sharded["embed"]["embedding"][...].is_fully_addressable
    replicated = NamedSharding(mesh, P())
    logits = jax.jit(forward, out_shardings=replicated)(sharded, tokens, positions)
    result["forward_max_diff"] = float(np.max(np.abs(np.asarray(logits.addressable_data(0)) - one)))

    try:  # the engine, SPMD: both processes run the same requests in lockstep
        ecfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_seqs=2, page_size=8,
                            max_model_len=64, block_q=8, num_pages=24, max_logprobs=4, attention_backend="xla")
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        prompts = [rng.integers(3, lm.cfg.vocab_size, n).tolist() for n in (3, 13)]
        runs = {}
        for name, engine_mesh in (("one", None), ("tp", mesh)):  # "one": this process's first device alone
            engine = LLMEngine(lm.model, lm.cfg, None, ecfg, warmup=False, progress=False, mesh=engine_mesh)
            ids = [engine.add_request(p, params, logprobs=3) for p in prompts]
            got = {rid: ([], []) for rid in ids}
            while engine.has_unfinished():
                for o in engine.step():
                    got[o.request_id][0].extend(o.new_token_ids)
                    got[o.request_id][1].extend(lp.logprob for lp in o.logprobs)
            runs[name] = [got[rid] for rid in ids]
        result["engine_tokens_equal"] = [a[0] == b[0] for a, b in zip(runs["one"], runs["tp"])]
        result["engine_max_logprob_diff"] = max(float(np.max(np.abs(np.asarray(a[1]) - np.asarray(b[1]))))
                                                for a, b in zip(runs["one"], runs["tp"]))
    except Exception as e:  # reported, and asserted on, by the test
        result["engine_error"] = f"{type(e).__name__}: {e}"
        result["engine_traceback"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
