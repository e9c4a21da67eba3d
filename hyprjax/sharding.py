"""Tensor parallelism: one rules table from logical axes to mesh axes, and the placements built on it.

Every array that crosses the step names its logical axes in one place: parameters and adapter
slot tables in the name table (`formats/names.py`: `param_axes`, `lora_axes`), the engine's KV
pool and penalty tables here (`KV_POOL_AXES`, `PENALTY_AXES`). `RULES` maps each logical axis
to a mesh axis; the model code names no axis at all, and XLA's GSPMD partitions the step from
the shardings of its inputs (plus the output constraints the runner pins, so every step's
outputs come back placed exactly as its inputs went in and no bucket compiles twice).

The mesh has one axis, "tp": q/k/v/gate/up are column-parallel (their output dim is split),
o/down row-parallel (their input dim is split; XLA adds the all-reduce), the embedding and the
LM head vocab-parallel, norms and the residual stream replicated, and the stacked layer axis is
never split (every device runs every layer of the scan). A dim is split only when it divides
evenly, in whole heads for the head axes; otherwise it is replicated and that is logged once
(e.g. k/v and the KV pool when there are fewer kv heads than devices).

Data-parallel replicas are not a mesh axis here: an engine step is one flattened row of tokens
over one shared page pool, so a "data" axis would have to split the pool and the scheduler's
pages with it. Replicas are independent engines (one per device group) behind a router
(hyprjax/engine/replicas.py, `hyprjax serve --data-parallel N`).

Multi-host: call `jax.distributed.initialize(...)` in every process before anything touches a
device; `jax.devices()` is then the global device list, `make_mesh` spans the processes and
`shard_params` builds each process's shards of the global arrays (README, "Tensor parallelism").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .adapters.lora import module_shapes
from .config import ModelConfig
from .errors import ConfigError
from .formats.names import lora_axes, param_axes, tensor_table

log = logging.getLogger("hyprjax.sharding")

TP = "tp"  # the mesh axis of tensor parallelism

# The one rules table: logical axis -> mesh axis (None: replicated). Every logical axis any
# table names must appear here (a typo fails loudly in `logical_spec`).
RULES: dict[str, str | None] = {
    "vocab": TP,  # embedding rows, LM head columns, logits, penalty tables
    "heads": TP,  # query heads: q_proj output, o_proj input
    "kv_heads": TP,  # key/value heads: k/v_proj output, the KV pool
    "mlp": TP,  # gate/up output, down input
    "embed": None,  # the residual stream (D) stays whole on every device
    "layers": None,  # the scanned layer axis
}

QFIELDS = ("qscale", "qsub", "qmin", "qmsub")  # a quantized matrix's scale arrays (hyprjax/qformat.py)
KV_POOL_AXES = ("layers", None, None, "kv_heads", None)  # KVPool.k / .v [L, P, page_size, K, H]
PENALTY_AXES = (None, "vocab")  # counts / seen [max_num_seqs, V]


def take_devices(count: int, asked: str) -> list:
    """The first `count` devices (global ones after `jax.distributed.initialize`), or a
    ConfigError saying that `asked` (the flags that asked for them) needs more than there are."""
    devices = jax.devices()
    if count > len(devices):
        raise ConfigError(f"{asked} needs {count} devices, {len(devices)} available ({jax.default_backend()}); "
                          f"on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts "
                          f"makes N host devices")
    return devices[:count]


def make_mesh(tensor_parallel: int, devices=None) -> Mesh:
    """A 1-D mesh ("tp",) over the first `tensor_parallel` devices (global ones after
    `jax.distributed.initialize`). Auto axes: GSPMD propagates shardings through the step."""
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) or tensor_parallel < 1:
        raise ConfigError(f"tensor_parallel={tensor_parallel!r} must be an integer >= 1")
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel > len(devices):
        raise ConfigError(f"tensor_parallel={tensor_parallel} exceeds the {len(devices)} devices available "
                          f"({jax.default_backend()}); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                          f"set before JAX starts makes N host devices")
    return Mesh(np.asarray(devices[:tensor_parallel]), (TP,), axis_types=(AxisType.Auto,))


def tensor_parallel_mesh(tensor_parallel: int) -> Mesh | None:
    """The mesh for `LLM(tensor_parallel=N)` / `--tensor-parallel N`: None for 1, so a single
    device runs with no mesh (and no sharding code) at all."""
    if type(tensor_parallel) is int and tensor_parallel == 1:
        return None
    return make_mesh(tensor_parallel)  # validates the value


def _units(axis: str, dim: int, cfg: ModelConfig) -> int:
    """How many indivisible pieces a dim of this logical axis holds: heads for the head axes
    (a q_proj output of N*H splits only between heads), else its size."""
    return {"heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads}.get(axis, dim)


_logged: set = set()


def logical_spec(axes: tuple, shape: tuple, cfg: ModelConfig, mesh: Mesh) -> P:
    """The PartitionSpec of an array of `shape` whose dims have logical `axes` (RULES applied;
    a dim that does not divide its mesh axis is replicated)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    parts = []
    for axis, dim in zip(axes, shape):
        if axis is None:
            parts.append(None)
            continue
        if axis not in RULES:
            raise ValueError(f"logical axis {axis!r} has no rule in hyprjax.sharding.RULES")
        target = RULES[axis]
        size = 1 if target is None else mesh.shape[target]
        units = _units(axis, dim, cfg)
        if size > 1 and units % size:
            if (axis, units, size) not in _logged:
                _logged.add((axis, units, size))
                log.info("%s (%d%s) does not divide over the %d-way %r mesh axis: replicated", axis, units,
                         " heads" if axis in ("heads", "kv_heads") else "", size, target)
            target = None
        parts.append(target if size > 1 else None)
    return P(*parts)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[tuple, NamedSharding]:
    """Parameter path (as in the name table) -> its NamedSharding."""
    shapes = {spec.path: spec.shape if spec.layer is None else (cfg.num_layers, *spec.shape)
              for spec in tensor_table(cfg)}
    return {path: NamedSharding(mesh, logical_spec(axes, shapes[path], cfg, mesh))
            for path, axes in param_axes(cfg).items()}


def place(x, sharding: NamedSharding) -> jax.Array:
    """`x` (an array on one device, or numpy) as a global array with `sharding`.

    Within one process a device-to-device `device_put`; across processes each process builds
    only its own shards from its (identical) full copy, as multi-controller JAX requires.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(state, cfg: ModelConfig, mesh: Mesh):
    """The model's split state (`nnx.split(model)[1]`) with every parameter placed per the tables.

    Returns a new state; `state` is left as it was.
    """
    shardings = param_shardings(cfg, mesh)
    paths = [tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
             for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    quantized = {p[:-1] for p in paths if p[-1] == "qscale"}  # modules whose kernel holds codes

    def entries(key: tuple, ndim: int) -> tuple:
        spec = tuple(shardings[key].spec)
        return spec + (None,) * (ndim - len(spec))

    def spec(key: tuple, x) -> P | None:
        """The PartitionSpec of the parameter at `key`, None if the tables lack it. A quantized
        matrix is stored transposed, codes [L?, dout, din] (hyprjax/qformat.py); its scales
        [L?, dout, groups] split as the codes do, the group dim only where the groups divide."""
        per_layer = len(key) > 1 and key[0] == "layers" and isinstance(key[1], int)  # CPU: one array per layer
        base = (key[0], *key[2:]) if per_layer else key
        ndim = x.ndim + per_layer  # of the stacked parameter
        owner, leaf = base[:-1], base[-1]
        if leaf in QFIELDS or (leaf == "kernel" and key[:-1] in quantized):
            if (*owner, "embedding") in shardings:  # rows of the embedding, the groups whole
                found = (entries((*owner, "embedding"), 2)[0], None)
            elif (*owner, "kernel") in shardings:  # [L?, din, dout] -> [L?, dout, din or groups]
                kernel = entries((*owner, "kernel"), ndim)
                found = (*kernel[:-2], kernel[-1], kernel[-2])
                if found[-1] is not None and x.shape[-1] % mesh.shape[found[-1]]:
                    found = (*found[:-1], None)
            else:
                return None
        elif base in shardings:
            found = entries(base, ndim)
        else:
            return None
        return P(*(found[1:] if per_layer else found))

    def one(path, x):
        key = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        found = spec(key, x)
        if found is None:
            raise ValueError(f"parameter {key} is not in the name table (formats/names.py): no sharding for it")
        return place(x, NamedSharding(mesh, found))

    return jax.tree_util.tree_map_with_path(one, state)


def shard_model(model, cfg: ModelConfig, mesh: Mesh) -> None:
    """Place a loaded model's parameters on `mesh` in place (the unsharded arrays are freed)."""
    from flax import nnx

    nnx.update(model, shard_params(nnx.state(model), cfg, mesh))


def lora_table_sharding(cfg: ModelConfig, mesh: Mesh | None):
    """For `LoraRegistry(sharding=...)`: module -> (a, b) NamedShardings of its slot tables
    ([L, S, din, R], [L, S, R, dout]); None without a mesh."""
    if mesh is None:
        return None
    axes, shapes = lora_axes(cfg), module_shapes(cfg)

    def sharding(module: str) -> tuple[NamedSharding, NamedSharding]:
        (a_axes, b_axes), (din, dout) = axes[module], shapes[module]
        a = logical_spec(a_axes, (cfg.num_layers, 1, din, 1), cfg, mesh)
        b = logical_spec(b_axes, (cfg.num_layers, 1, 1, dout), cfg, mesh)
        return NamedSharding(mesh, a), NamedSharding(mesh, b)

    return sharding


class StepShardings(NamedTuple):
    """Where the jitted step's carried state lives; static (hashable) arguments of the step."""

    kv: NamedSharding  # each of KVPool.k, .v
    penalties: NamedSharding  # counts and seen
    replicated: NamedSharding  # what the host reads back (tokens, logprobs)


def kv_shards(cfg: ModelConfig, mesh: Mesh | None) -> int:
    """How many devices split each KV page: the mesh's size when the kv heads divide over it,
    else 1 (the pool is replicated). The engine sizes its pool by it (engine/memory.py)."""
    if mesh is None:
        return 1
    spec = logical_spec(KV_POOL_AXES, (cfg.num_layers, 1, 1, cfg.num_kv_heads, cfg.head_dim), cfg, mesh)
    return mesh.shape[TP] if spec[3] == TP else 1


def step_shardings(cfg: ModelConfig, mesh: Mesh | None, num_pages: int, page_size: int,
                   max_num_seqs: int) -> StepShardings | None:
    """The engine state's shardings on `mesh`; None without one (single device, no mesh code)."""
    if mesh is None:
        return None
    pool = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return StepShardings(NamedSharding(mesh, logical_spec(KV_POOL_AXES, pool, cfg, mesh)),
                         NamedSharding(mesh, logical_spec(PENALTY_AXES, (max_num_seqs, cfg.vocab_size), cfg, mesh)),
                         NamedSharding(mesh, P()))


@dataclass(frozen=True)
class KernelSharding:
    """How the Pallas kernels run under `shard_map` (engine/paged.py); static and hashable.

    `heads`: the mesh axis attention splits q heads and the KV pool's kv heads over, or None
    (kv heads do not divide the mesh: the kernel runs whole on every device). `lora`: per
    module, the mesh axes of its slot tables' din (a) and dout (b).
    """

    mesh: Mesh
    heads: str | None
    lora: tuple[tuple[str, str | None, str | None], ...]  # (module, din axis, dout axis)

    def lora_axes(self, module: str) -> tuple[str | None, str | None]:
        for name, din, dout in self.lora:
            if name == module:
                return din, dout
        raise KeyError(module)


def kernel_sharding(cfg: ModelConfig, mesh: Mesh | None) -> KernelSharding | None:
    """The kernels' shard_map plan on `mesh`; None without a mesh or on a 1-device one."""
    if mesh is None or mesh.size == 1:
        return None
    pool = logical_spec(KV_POOL_AXES, (cfg.num_layers, 1, 1, cfg.num_kv_heads, cfg.head_dim), cfg, mesh)
    tables = lora_table_sharding(cfg, mesh)
    lora = tuple((m, tables(m)[0].spec[2], tables(m)[1].spec[3]) for m in lora_axes(cfg))
    return KernelSharding(mesh, pool[3], lora)
