"""merge_adapters against PEFT's LoraModel.add_weighted_adapter on a tiny random Qwen3.

Three random PEFT LoRA adapters of rank 4 (nonzero lora_B, different alphas, one with rsLoRA, two
targeting different module subsets) are read off the PeftModel into LoraAdapters. For each
strategy PEFT merges them with add_weighted_adapter(majority_sign_method="total") and we merge
the LoraAdapters; compared are the set of merged (layer, module) pairs, the merged scale against
PEFT's `scaling[merged]`, and every module's dense delta (PEFT's get_delta_weight, transposed to
[din, dout], against LoraModule.delta()), to atol 1e-5.

DARE draws random masks, which torch's RNG cannot reproduce, so during PEFT's merge its
`merge_utils.random_pruning` is replaced by one that applies the masks merge_adapters draws:
it finds which adapter factor it was handed by the tensor's storage pointer and uses
`dare_mask(shape, density, dare_rng(seed, layer, module, factor, adapter index))`, transposed to
PEFT's layout. Everything else in PEFT's DARE (rescaling, sign election, disjoint mean) is its own.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

from tests.tiny_models import make_hf_model
from hyprjax.adapters.lora import MODULES, AdapterError, LoraAdapter, LoraModule
from hyprjax.adapters.merge import STRATEGIES, dare_mask, dare_rng, merge_adapters
from tests.deps import need

torch = need("torch")
peft = need("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402

R = 4
CONFIGS = {
    "a0": dict(lora_alpha=8, target_modules=list(MODULES)),
    "a1": dict(lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    "a2": dict(lora_alpha=5, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
}
DENSITY = {"linear": None, "ties": 0.5, "dare_linear": 0.6, "dare_ties": 0.4}
_merged_names = (f"merged{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory):
    """A PeftModel over a tiny Qwen3 holding the adapters of CONFIGS, all with random factors."""
    model = make_hf_model(tmp_path_factory.mktemp("qwen3"))
    torch.manual_seed(1)
    pm = None
    for name, kwargs in CONFIGS.items():
        cfg = peft.LoraConfig(r=R, init_lora_weights=False, **kwargs)  # False: lora_B random, not zero
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    return pm


@pytest.fixture(scope="module")
def ours(peft_model):
    return {name: to_lora_adapter(peft_model, name) for name in CONFIGS}


def lora_layers(pm):
    """((layer, module name), LoraLayer) for every LoRA-wrapped linear in the model."""
    for path, module in pm.named_modules():
        if isinstance(module, LoraLayer):
            yield (int(re.search(r"\.layers\.(\d+)\.", path).group(1)), path.rsplit(".", 1)[1]), module


def to_lora_adapter(pm, name: str) -> LoraAdapter:
    def t(w):
        return w.detach().numpy().T.copy()
    modules = {key: LoraModule(a=t(m.lora_A[name].weight), b=t(m.lora_B[name].weight), scale=float(m.scaling[name]))
               for key, m in lora_layers(pm) if name in m.lora_A}
    return LoraAdapter(name=name, path="", modules=modules)


def peft_merge(pm, monkeypatch, names, weights, strategy, density, seed=0) -> str:
    """Run PEFT's add_weighted_adapter (with our DARE masks); returns the merged adapter's name."""
    merged = next(_merged_names)
    calls = []
    if strategy.startswith("dare"):
        factors = {}
        for (layer, module), m in lora_layers(pm):
            for i, n in enumerate(names):
                if n in m.lora_A:
                    factors[m.lora_A[n].weight.data_ptr()] = (layer, module, "a", i)
                    factors[m.lora_B[n].weight.data_ptr()] = (layer, module, "b", i)

        def random_pruning(tensor, density, rescale):
            layer, module, factor, i = factors[tensor.data_ptr()]
            keep = dare_mask(tuple(tensor.shape[::-1]), density, dare_rng(seed, layer, module, factor, i))
            calls.append((layer, module, factor, i))
            pruned = tensor * torch.from_numpy(keep.T.copy()).to(tensor.dtype)
            return pruned / density if rescale else pruned

        monkeypatch.setattr(peft.utils.merge_utils, "random_pruning", random_pruning)
    pm.add_weighted_adapter(names, weights, merged, combination_type=strategy, density=density,
                            majority_sign_method="total")
    monkeypatch.undo()
    if strategy.startswith("dare"):  # the patch really stood in for every factor PEFT pruned
        assert sorted(calls) == sorted(factors.values())
    return merged


def peft_deltas(pm, merged: str) -> dict[tuple[int, str], tuple[np.ndarray, float]]:
    """(layer, module) -> (PEFT's merged delta as [din, dout], PEFT's merged scaling)."""
    return {key: (m.get_delta_weight(merged).detach().numpy().T, float(m.scaling[merged]))
            for key, m in lora_layers(pm) if merged in m.lora_A}


@pytest.mark.parametrize("names,weights", [(["a0", "a1", "a2"], [0.7, -0.4, 1.3]), (["a1", "a2"], [1.1, 0.6])],
                         ids=["three", "partial_targets"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_peft(peft_model, ours, monkeypatch, strategy, names, weights):
    density = DENSITY[strategy]
    merged = peft_merge(peft_model, monkeypatch, names, weights, strategy, density, seed=3)
    got = merge_adapters([ours[n] for n in names], weights, strategy, density=density, seed=3, name="mix")
    want = peft_deltas(peft_model, merged)
    assert set(got.modules) == set(want)
    assert got.rank == R and got.name == "mix" and got.path == ""
    for key, (delta, scale) in want.items():
        assert got.modules[key].scale == scale == 1.0
        assert got.modules[key].a.dtype == got.modules[key].b.dtype == np.float32
        np.testing.assert_allclose(got.modules[key].delta(), delta, rtol=1e-5, atol=1e-5, err_msg=str(key))


@pytest.mark.filterwarnings("ignore:The density")
def test_density_one_prunes_nothing(peft_model, ours, monkeypatch):
    names, weights = ["a0", "a2"], [0.5, 0.8]
    merged = peft_merge(peft_model, monkeypatch, names, weights, "ties", 1.0)
    got = merge_adapters([ours[n] for n in names], weights, "ties", density=1.0, name="mix")
    for key, (delta, _) in peft_deltas(peft_model, merged).items():
        np.testing.assert_allclose(got.modules[key].delta(), delta, rtol=1e-5, atol=1e-5)
    dare = merge_adapters([ours[n] for n in names], weights, "dare_ties", density=1.0, name="mix")
    for key, m in got.modules.items():
        np.testing.assert_array_equal(dare.modules[key].a, m.a)


def test_single_adapter_is_linear_and_identity(peft_model, ours, monkeypatch):
    """PEFT falls back to linear for one adapter; at weight 1 that gives the adapter's own delta back."""
    merged = peft_merge(peft_model, monkeypatch, ["a1"], [1.0], "ties", 0.3)
    got = merge_adapters([ours["a1"]], [1.0], "ties", density=0.3, name="mix")
    want = peft_deltas(peft_model, merged)
    assert set(got.modules) == set(want) == set(ours["a1"].modules)
    for key, (delta, _) in want.items():
        np.testing.assert_allclose(got.modules[key].delta(), delta, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.modules[key].delta(), ours["a1"].modules[key].delta(), rtol=1e-5, atol=1e-6)


def test_rslora_first_is_not_overscaled(peft_model, ours, monkeypatch):
    """PEFT <= 0.21 copies use_rslora from adapters[0] into the merged config, so its merged scaling
    is sqrt(r) rather than 1 (huggingface/peft#3449). Our factors equal PEFT's; our scale is 1."""
    names, weights = ["a2", "a0"], [0.9, 0.4]
    merged = peft_merge(peft_model, monkeypatch, names, weights, "linear", None)
    got = merge_adapters([ours[n] for n in names], weights, "linear", name="mix")
    for key, (delta, scale) in peft_deltas(peft_model, merged).items():
        assert scale in (1.0, math.sqrt(R))
        assert got.modules[key].scale == 1.0
        np.testing.assert_allclose(scale * got.modules[key].delta(), delta, rtol=1e-5, atol=1e-5)


def test_seed(ours):
    adapters, weights = [ours["a0"], ours["a1"]], [0.7, 0.5]
    first = merge_adapters(adapters, weights, "dare_ties", density=0.5, seed=7, name="x")
    again = merge_adapters(adapters, weights, "dare_ties", density=0.5, seed=7, name="x")
    other = merge_adapters(adapters, weights, "dare_ties", density=0.5, seed=8, name="x")
    for key, m in first.modules.items():
        np.testing.assert_array_equal(m.a, again.modules[key].a)
        np.testing.assert_array_equal(m.b, again.modules[key].b)
    assert any(not np.array_equal(m.a, other.modules[key].a) for key, m in first.modules.items())


def test_masks_do_not_depend_on_other_adapters(ours):
    """An extra adapter at weight 0 leaves a dare_linear merge unchanged: the others' masks are the same."""
    two = merge_adapters([ours["a0"], ours["a1"]], [0.7, 0.5], "dare_linear", density=0.5, seed=2, name="x")
    three = merge_adapters([ours["a0"], ours["a1"], ours["a2"]], [0.7, 0.5, 0.0], "dare_linear",
                           density=0.5, seed=2, name="x")
    for key, m in two.modules.items():
        np.testing.assert_allclose(three.modules[key].delta(), m.delta(), rtol=1e-6, atol=1e-7)


def _adapter(name: str, ranks: dict[tuple[int, str], int]) -> LoraAdapter:
    rng = np.random.default_rng(0)
    return LoraAdapter(name=name, path="", modules={
        key: LoraModule(rng.normal(size=(8, r)).astype(np.float32), rng.normal(size=(r, 6)).astype(np.float32), 1.0)
        for key, r in ranks.items()})


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="svd"), r"unknown merge strategy 'svd'"),
    (dict(adapters=[], weights=[]), "at least one adapter"),
    (dict(weights=[1.0]), "got 1 weights for 2 adapters"),
    (dict(weights=[1.0, float("nan")]), "adapter 'y' must be a finite number, got nan"),
    (dict(weights=[float("inf"), 1.0]), "adapter 'x' must be a finite number, got inf"),
    (dict(strategy="ties", density=None), r"'ties' needs a density in \(0, 1\].*density=None"),
    (dict(strategy="dare_ties", density=0.0), "density=0.0"),
    (dict(strategy="dare_linear", density=1.5), "density=1.5"),
    (dict(strategy="ties", density=float("nan")), "density=nan"),
    (dict(strategy="linear", density=0.5), "density=0.5 has no effect"),
    (dict(strategy="dare_ties", density=0.5, seed=-1), "seed=-1"),
])
def test_errors(kwargs, match):
    args = dict(adapters=[_adapter("x", {(0, "q_proj"): 2}), _adapter("y", {(0, "q_proj"): 2})],
                weights=[1.0, 1.0], strategy="linear", density=None, name="m")
    args.update(kwargs)
    with pytest.raises(AdapterError, match=match):
        merge_adapters(**args)


def test_unequal_ranks():
    x, y = _adapter("x", {(0, "q_proj"): 2}), _adapter("y", {(0, "q_proj"): 4})
    with pytest.raises(AdapterError, match=r"equal rank.*'x' r=2, 'y' r=4"):
        merge_adapters([x, y], [1.0, 1.0], "ties", density=0.5, name="m")
    # Same adapter rank, but the two disagree at one module (PEFT's torch.stack would fail there).
    x, y = _adapter("x", {(0, "q_proj"): 2, (1, "v_proj"): 4}), _adapter("y", {(0, "q_proj"): 4, (1, "v_proj"): 4})
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: adapters disagree on rank"):
        merge_adapters([x, y], [1.0, 1.0], "linear", name="m")
