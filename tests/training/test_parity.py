"""Training parity with PEFT + transformers (torch): one step's loss and adapter gradients, and
ten AdamW steps, from the same initial adapter on tiny random Qwen3 and Gemma 3 models."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyprjax.adapters.lora import MODULES
from hyprjax.formats.load import load_model
from hyprjax.training.lora import init_lora
from hyprjax.training.step import loss_sums, make_optimizer, make_train_step, schedule_value
from tests.deps import need
from tests.tiny_models import make_hf_model

torch = need("torch")
peft = need("peft")

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


def _setup(tmp_path, arch):
    hf = make_hf_model(tmp_path, arch)
    loaded = load_model(tmp_path, dtype="float32", with_tokenizer=False, scan_layers=True, progress=False)
    graphdef, base = nnx.split(loaded.model)
    lora = init_lora(loaded.cfg, RANK, MODULES, jax.random.key(0))
    rng = np.random.default_rng(1)  # B nonzero, so A's gradient is too
    lora = {m: {"a": ab["a"], "b": jnp.asarray(rng.normal(0, 0.05, ab["b"].shape), jnp.float32)}
            for m, ab in lora.items()}
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(MODULES), lora_dropout=0.0,
                             init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    _copy_into(pm, lora)
    return loaded.cfg, graphdef, base, lora, pm


def _torch_params(pm):
    """(layer, module, 'a'|'b') -> the PEFT parameter holding it."""
    out = {}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            module = next(m for m in MODULES if m in parts)
            out[(layer, module, "a" if "lora_A" in name else "b")] = p
    return out


def _copy_into(pm, lora):
    with torch.no_grad():
        for (layer, module, half), p in _torch_params(pm).items():
            p.copy_(torch.from_numpy(np.asarray(lora[module][half][layer]).T.copy()))


def _batch(cfg, rows=2, t=24, seed=3):
    """Unpacked rows (one document each); every token after the fourth is a target."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (rows, t)).astype(np.int32)
    target = np.zeros((rows, t), bool)
    target[:, 4:] = True
    target[1, 10:14] = False
    labels = np.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    weights = np.zeros((rows, t), np.float32)
    weights[:, :-1] = target[:, 1:]
    ours = dict(tokens=tokens, positions=np.tile(np.arange(t, dtype=np.int32), (rows, 1)),
                segments=np.ones((rows, t), np.int32), labels=labels, weights=weights)
    hf_labels = np.where(target, tokens, -100)
    return ours, torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(hf_labels.astype(np.int64))


def _step_both(graphdef, base, lora, pm, batch, ids, labels):
    """(our mean loss, our adapter gradients, PEFT's output after its backward) on one batch."""
    def loss(lora):
        s, n = loss_sums(lora, base, graphdef, batch, scale=SCALE)
        return s / n

    ours, grads = jax.value_and_grad(loss)(lora)
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    return ours, grads, out


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_one_step_loss_and_gradients_equal_peft(tmp_path, arch):
    cfg, graphdef, base, lora, pm = _setup(tmp_path, arch)
    batch, ids, labels = _batch(cfg)
    ours, grads, out = _step_both(graphdef, base, lora, pm, batch, ids, labels)
    assert abs(float(ours) - out.loss.item()) <= 1e-5, (float(ours), out.loss.item())
    for (layer, module, half), p in _torch_params(pm).items():
        want = p.grad.numpy().T
        got = np.asarray(grads[module][half][layer])
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= 1e-4, (layer, module, half, rel)


def test_remat_and_accumulation_give_the_same_step(tmp_path):
    """Rematerialised layers (each, or every 2) and 2 accumulated micro-batches of 1 row: the
    same loss and adapter after a step as the plain step on both rows at once."""
    cfg, graphdef, base, lora, _ = _setup(tmp_path, "qwen3")
    batch, _, _ = _batch(cfg)
    opt = make_optimizer(1e-2, 10, warmup=0, weight_decay=0.01, clip=1.0)
    results = []
    for remat, accum in ((0, 1), (1, 1), (2, 1), (0, 2)):
        stacked = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
        params = jax.tree.map(jnp.copy, lora)
        step = make_train_step(graphdef, opt, scale=SCALE, remat=remat)
        params, _, metrics = step(params, opt.init(params), base, stacked)
        results.append((float(metrics["loss"]), params))
    for loss, params in results[1:]:
        assert abs(loss - results[0][0]) <= 1e-6
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), params, results[0][1])


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_ten_adamw_steps_equal_torch(tmp_path, arch):
    """Our jitted step (clip, AdamW, warmup + cosine) against torch's AdamW with the same
    clipping and per-step learning rates, on the same batches: the adapters agree within 1e-4."""
    cfg, graphdef, base, lora, pm = _setup(tmp_path, arch)
    lr, steps, warmup, wd, clip = 3e-3, 10, 3, 0.01, 0.5
    opt = make_optimizer(lr, steps, warmup=warmup, weight_decay=wd, clip=clip)
    step = make_train_step(graphdef, opt, scale=SCALE)
    params = jax.tree.map(jnp.copy, lora)
    opt_state = opt.init(params)
    tparams = _torch_params(pm)
    topt = torch.optim.AdamW(list(tparams.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    for k in range(steps):
        batch, ids, labels = _batch(cfg, seed=10 + k)
        params, opt_state, _ = step(params, opt_state, base, {n: v[None] for n, v in batch.items()})
        for g in topt.param_groups:
            g["lr"] = schedule_value(lr, steps, warmup, k)
        topt.zero_grad()
        pm(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
        topt.step()
    for (layer, module, half), p in tparams.items():
        want = p.detach().numpy().T
        got = np.asarray(params[module][half][layer])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{layer} {module} {half}")
        assert np.abs(got - np.asarray(lora[module][half][layer])).max() > 1e-3  # it did train


def test_bfloat16_compute_keeps_float32_master_state(tmp_path):
    """--dtype bfloat16: the base computes in bfloat16, the adapter, its gradients and AdamW's
    moments stay float32. Loss within 1% of PEFT's float32 loss, gradients within 5% (relative
    norm): bfloat16 keeps 8 mantissa bits."""
    _, _, _, lora, pm = _setup(tmp_path, "qwen3")
    loaded = load_model(tmp_path, dtype="bfloat16", with_tokenizer=False, scan_layers=True, progress=False)
    graphdef, base = nnx.split(loaded.model)
    batch, ids, labels = _batch(loaded.cfg)
    ours, grads, out = _step_both(graphdef, base, lora, pm, batch, ids, labels)
    assert abs(float(ours) - out.loss.item()) <= 1e-2 * out.loss.item()
    for (layer, module, half), p in _torch_params(pm).items():
        got = grads[module][half]
        assert got.dtype == jnp.float32
        want = p.grad.numpy().T
        rel = np.linalg.norm(np.asarray(got[layer]) - want) / np.linalg.norm(want)
        assert rel <= 5e-2, (layer, module, half, rel)
    opt = make_optimizer(1e-3, 10, warmup=0, weight_decay=0.0, clip=1.0)
    step = make_train_step(graphdef, opt, scale=SCALE)
    params, state, _ = step(jax.tree.map(jnp.copy, lora), opt.init(lora), base, {k: v[None] for k, v in batch.items()})
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
