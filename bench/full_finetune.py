"""Fully fine-tune a small real model on local text and save it as a HF SafeTensors directory.

    python bench/full_finetune.py                          # SmolLM2-135M-Instruct on Python's docs, ~12 min
    python bench/full_finetune.py --steps 2 --out /tmp/ft  # a smoke run

No model hub is reachable here, so bench/compression.py needs a fine-tune made locally: this
script makes one. The base is the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the
package index; hyprjax/default_model.py), dequantized to float32. Every linear weight (q, k, v,
o, gate, up, down of all layers: 106M of its 135M parameters) is trained with AdamW; embeddings
and norms stay frozen, so tuned - base lives entirely in the modules an adapter can target, and
compression is measured against a delta that an adapter could, in principle, hold exactly.

Data: the English prose of Python's reference documentation (`pydoc_data.topics`, installed with
every CPython): topics sorted by name, every 5th held out (7% of the text; `heldout_ids`, which
bench/compression.py scores), the rest cut into windows of --seq tokens, shuffled by --seed.
Our JAX model (hyprjax/model.py, layers stacked and scanned) computes the loss; the step is one
jitted pure function with the trained kernels and AdamW state donated.

Writes OUT/config.json (LlamaForCausalLM), OUT/model.safetensors (float32: tuned kernels, the
base's other tensors), OUT/tokenizer.json and OUT/finetune.json (settings, losses, held-out
perplexity before and after, time).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DEFAULT_OUT = HERE / "models" / "smollm2-135m-pydoc-ft"


def log(msg: str) -> None:
    print(f"[full_finetune] {msg}", file=sys.stderr, flush=True)


def corpus(tokenizer, *, heldout: bool) -> list[int]:
    """Token ids of the training topics (heldout=False) or of every 5th topic (heldout=True)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % 5 == 4) == heldout]
    return tokenizer.encode("\n\n".join(topics[k] for k in chosen), add_special_tokens=False)


def heldout_ids(tokenizer, window: int, n: int) -> np.ndarray:
    """i32[n, window + 1]: the first n held-out windows (inputs and next-token labels)."""
    ids = corpus(tokenizer, heldout=True)
    windows = [ids[i:i + window + 1] for i in range(0, len(ids) - window, window)][:n]
    return np.asarray(windows, np.int32)


def hf_config(cfg) -> dict:
    """config.json for a llama-architecture ModelConfig (ModelConfig.from_hf reads it back)."""
    assert cfg.arch == "llama", cfg.arch
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
                tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None, hidden_act="silu",
                attention_bias=cfg.qkv_bias, mlp_bias=False, torch_dtype="float32")


def save_hf(out: Path, lm, state_pure: dict) -> None:
    """Every tensor of the name table, from the (stacked) model state, in HF layout, float32."""
    from safetensors.numpy import save_file

    from hyprjax.formats.names import tensor_table

    tensors = {}
    for spec in tensor_table(lm.cfg):
        x = state_pure
        for key in spec.path:
            x = x[key]
        x = np.asarray(x, np.float32)
        if spec.layer is not None:
            x = x[spec.layer]
        tensors[spec.hf] = np.ascontiguousarray(x.T if spec.transpose else x)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(lm.cfg), indent=2) + "\n")
    lm.tokenizer.backend.save(str(out / "tokenizer.json"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m-instruct", help="base model (a known name, .gguf or HF dir)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tqdm import tqdm

    from hyprjax.formats.load import load_model

    t_start = time.perf_counter()
    lm = load_model(args.base, dtype="float32", quantization="none", scan_layers=True)
    log(f"base {lm.path} ({lm.cfg.arch}, {lm.cfg.num_layers} layers)")
    graphdef, kernels, rest = nnx.split(lm.model, nnx.PathContains("kernel"), ...)
    n_train = sum(x.size for x in jax.tree.leaves(kernels))
    log(f"training {n_train / 1e6:.1f}M parameters (every linear kernel); the rest frozen")

    train_ids = np.asarray(corpus(lm.tokenizer, heldout=False), np.int32)
    w = args.seq + 1
    windows = train_ids[:len(train_ids) // w * w].reshape(-1, w)
    rng = np.random.default_rng(args.seed)
    eval_batch = heldout_ids(lm.tokenizer, args.seq, args.eval_windows)
    log(f"corpus: {len(train_ids)} training tokens ({len(windows)} windows of {args.seq}), "
        f"{eval_batch.size} held-out tokens")
    positions = jnp.arange(args.seq, dtype=jnp.int32)[None]

    def loss_fn(kernels, rest, batch):
        model = nnx.merge(graphdef, kernels, rest)
        logits, _ = model(batch[:, :-1], jnp.broadcast_to(positions, batch[:, :-1].shape))
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0]
        return nll.mean()

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, max(args.steps, args.warmup + 1),
                                                  end_value=args.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=args.weight_decay))
    opt_state = opt.init(kernels)

    @jax.jit
    def eval_loss(kernels, rest, batch):
        return loss_fn(kernels, rest, batch)

    def step(kernels, opt_state, rest, batch):
        loss, g = jax.value_and_grad(loss_fn)(kernels, rest, batch)
        updates, opt_state = opt.update(g, opt_state, kernels)
        return optax.apply_updates(kernels, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))

    def heldout_ppl(kernels) -> float:
        losses = [float(eval_loss(kernels, rest, jnp.asarray(eval_batch[i:i + args.batch])))
                  for i in range(0, len(eval_batch), args.batch)]
        return math.exp(float(np.mean(losses)))

    ppl_before = heldout_ppl(kernels)
    log(f"held-out perplexity before: {ppl_before:.3f}")
    losses, t0 = [], time.perf_counter()
    order = rng.permutation(len(windows))
    bar = tqdm(range(args.steps), desc="fine-tuning", unit="step")
    for s in bar:
        idx = order[(np.arange(args.batch) + s * args.batch) % len(order)]
        kernels, opt_state, loss = step(kernels, opt_state, rest, jnp.asarray(windows[idx]))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_s = time.perf_counter() - t0
    ppl_after = heldout_ppl(kernels)
    log(f"held-out perplexity after: {ppl_after:.3f} (train {train_s:.0f} s, "
        f"{args.steps * args.batch * args.seq / train_s:.0f} tokens/s)")

    state = nnx.merge_state(kernels, rest)
    out = Path(args.out)
    save_hf(out, lm, nnx.to_pure_dict(state))
    (out / "finetune.json").write_text(json.dumps(dict(
        base=str(lm.path), steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed, trained_params=int(n_train),
        train_tokens_seen=args.steps * args.batch * args.seq, losses=losses, heldout_tokens=int(eval_batch.size),
        heldout_ppl_before=ppl_before, heldout_ppl_after=ppl_after, train_seconds=train_s,
        total_seconds=time.perf_counter() - t_start, device=str(jax.devices()[0])), indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
