"""Data- and tensor-parallel training over one 2-D mesh ("data", "tp").

The base weights are placed by the inference rules (hyprjax/sharding.py: column-parallel
q/k/v/gate/up, row-parallel o/down, vocab-parallel embedding) over "tp" and replicated over
"data"; the batch's rows are split over "data"; the adapter leaves and AdamW's state are small
and replicated. XLA's GSPMD partitions the jitted step from these input shardings: each data
group computes its rows' summed loss and gradient, and the all-reduce it inserts makes the sum
over all rows, so the step equals the one-device step up to the order of float additions.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ..config import ModelConfig
from ..errors import ConfigError
from ..sharding import TP, shard_params, take_devices

DATA = "data"


def training_mesh(data_parallel: int, tensor_parallel: int, batch_size: int) -> Mesh | None:
    """The ("data", "tp") mesh over the first dp * tp devices; None for one device."""
    for name, n in (("--data-parallel", data_parallel), ("--tensor-parallel", tensor_parallel)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{name} must be a positive integer, got {n!r}")
    if data_parallel * tensor_parallel == 1:
        return None
    if batch_size % data_parallel:
        raise ConfigError(f"--batch-size {batch_size} does not split over --data-parallel {data_parallel}")
    devices = take_devices(data_parallel * tensor_parallel,
                           f"--data-parallel {data_parallel} x --tensor-parallel {tensor_parallel}")
    grid = np.asarray(devices).reshape(data_parallel, tensor_parallel)
    return Mesh(grid, (DATA, TP), axis_types=(AxisType.Auto, AxisType.Auto))


def place_base(base, cfg: ModelConfig, mesh: Mesh | None):
    return base if mesh is None else shard_params(base, cfg, mesh)


def replicate(tree, mesh: Mesh | None):
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, P()))


def place_batch(batch: dict, mesh: Mesh | None, row_axis: int) -> dict:
    """Split the rows (axis `row_axis`) of each batch array over "data"."""
    if mesh is None:
        return batch
    spec = P(*([None] * row_axis), DATA)
    return {k: jax.device_put(v, NamedSharding(mesh, spec)) for k, v in batch.items()}
