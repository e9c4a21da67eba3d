"""One optimizer step, as a pure function jitted once: `(lora, opt_state, base, batch) -> (lora, opt_state, metrics)`.

The loss is the mean next-token cross-entropy over the batch's target tokens (`weights`), the
way transformers averages over labels that are not -100. With gradient accumulation the batch
arrives as [A, B, S]: a `lax.scan` sums each micro-batch's summed loss and gradient and divides
once by the total target count, so A micro-batches of B rows give the same step as one batch of
A*B rows (not the mean of per-micro-batch means, which weights short micro-batches up).

Mixed precision: the base model may sit in bfloat16 (`--dtype bfloat16`) and the adapter's
float32 leaves are cast to it at use (training/lora.py), so matmuls run in bfloat16 while the
master adapter, its gradients and AdamW's moments stay float32. No loss scaling: bfloat16 keeps
float32's 8-bit exponent, so small gradients do not underflow the way they do in float16 (whose
5-bit exponent is why fp16 training scales the loss); only mantissa precision is lost, and the
float32 master copy absorbs the small updates.

Rematerialisation (`remat` N > 0) keeps only every N-th layer's input for the backward pass
(model.Model.__call__), trading one more forward for activation memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..model import causal_attention
from .lora import TrainLora

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # keep only each group's input
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also keep matmul outputs
}


def make_schedule(lr: float, steps: int, warmup: int):
    """Linear warmup over `warmup` steps, then cosine decay to a tenth of `lr` at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, max(steps, warmup + 1),
                                              end_value=lr * 0.1)


def make_optimizer(lr: float, steps: int, *, warmup: int, weight_decay: float, clip: float) -> optax.GradientTransformation:
    """AdamW under `make_schedule`, after global-norm clipping."""
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(make_schedule(lr, steps, warmup), weight_decay=weight_decay))


def schedule_value(lr: float, steps: int, warmup: int, step: int) -> float:
    """The learning rate `make_optimizer` applies at (0-based) `step`: for metrics and tests."""
    return float(make_schedule(lr, steps, warmup)(step))


def loss_sums(lora: dict, base, graphdef, batch: dict, *, scale: float, remat: int = 0, remat_policy=None,
              masks: dict | None = None):
    """(summed cross-entropy over target tokens, their count) for one batch of packed rows [B, S].

    `masks`: the sparse kinds' fixed indices (training/sparse.py), an argument, not differentiated."""
    model = nnx.merge(graphdef, base)
    attention = functools.partial(causal_attention, segments=batch["segments"])
    logits, _ = model(batch["tokens"], batch["positions"], attention=attention,
                      adapter=TrainLora(lora, scale, masks), remat=remat, remat_policy=remat_policy)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, batch["labels"][..., None], -1)[..., 0]
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, scale: float, remat: int = 0,
                    remat_policy=None):
    """The jitted step; `lora` and `opt_state` are donated. batch leaves are [A, B, S]; `masks`
    (sparse kinds) are passed as they are, never updated."""
    loss = functools.partial(loss_sums, graphdef=graphdef, scale=scale, remat=remat, remat_policy=remat_policy)
    grad = jax.value_and_grad(loss, has_aux=True)

    def step(lora, opt_state, base, batch, masks=None):
        def micro(carry, mb):
            g_sum, loss_sum, count = carry
            (l, n), g = grad(lora, base, batch=mb, masks=masks)
            return (jax.tree.map(jnp.add, g_sum, g), loss_sum + l, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, lora)
        (g, loss_sum, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        denom = jnp.maximum(count, 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        updates, opt_state = optimizer.update(g, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        return lora, opt_state, {"loss": loss_sum / denom, "grad_norm": _norm(g), "tokens": count}

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(graphdef, *, scale: float):
    """Jitted (summed loss, target count) of one batch [B, S]; no gradient."""
    return jax.jit(lambda lora, base, batch, masks=None: loss_sums(lora, base, graphdef, batch, scale=scale,
                                                                   masks=masks))


def make_fisher_step(graphdef, probes: dict[str, tuple[int, ...]], *, scale: float, remat: int = 0,
                     remat_policy=None):
    """The sparse masks' warm-up step, jitted with `scores` donated:
    `(scores, lora, base, batch) -> scores + g**2`, g the step's mean-loss gradient (as the train
    step computes it over [A, B, S]) with respect to each targeted module's dense weight delta
    f32[L, din, dout] (`probes`: module -> that shape), taken through a zero probe in the seam
    (training/sparse.py), at the adapter `lora` (LoRA leaves, or {})."""
    def step(scores, lora, base, batch):
        def loss(probe, mb):
            params = {m: {**lora.get(m, {}), "probe": probe[m]} for m in probe}
            return loss_sums(params, base, graphdef, mb, scale=scale, remat=remat, remat_policy=remat_policy)

        zeros = {m: jnp.zeros(s, jnp.float32) for m, s in probes.items()}

        def micro(carry, mb):
            g_sum, count = carry
            g, n = jax.grad(loss, has_aux=True)(zeros, mb)
            return (jax.tree.map(jnp.add, g_sum, g), count + n), None

        (g, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0)), batch)
        denom = jnp.maximum(count, 1.0)
        return jax.tree.map(lambda s, x: s + jnp.square(x / denom), scores, g)

    return jax.jit(step, donate_argnums=(0,))


def _norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
