"""Merged mode: one hot adapter added into the base weights, and taken out again exactly.

When one adapter carries (nearly) all the traffic, adding its delta per token is wasted work:
`merge_into` adds it into the weights once, and requests naming it alone then run the base
model's step (no pair loops at all). The cost of the merge follows the adapter, not the model:

  * element-sparse: a scatter-add of its nnz values, O(nnz);
  * block-sparse: a scatter-add of its blocks, O(nb * b^2);
  * low-rank: the dense delta scale * a @ b, O(din * dout) (a low-rank delta touches every weight).

Each touched kernel is updated in place (the old array is donated), and exactly the values the
merge overwrote are saved first (nnz values for a sparse part, the whole kernel for a low-rank
part), so `unmerge` writes them back bit for bit: no `W + d - d` rounding. Only float kernels
can be merged (a quantized kernel has no exact place to add a delta into); the engine refuses
otherwise.

`sites` is the engine's view of its kernels: (layer, module) -> (get() -> array [din, dout],
set(array)); on GPU/TPU the layers are stacked and the site slices one layer out of
[L, din, dout] (`stacked_site`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .lora import AdapterError, LoraAdapter


@jax.jit
def _gather(w, rows, cols):
    return w[rows, cols]


def _donating(fn):
    return jax.jit(fn, donate_argnums=0)


@_donating
def _scatter_add(w, rows, cols, vals):
    return w.at[rows, cols].add(vals.astype(w.dtype))


@_donating
def _scatter_set(w, rows, cols, vals):
    return w.at[rows, cols].set(vals)


@_donating
def _add_dense(w, delta):
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


@_donating
def _set_all(w, old):
    del w
    return old


@dataclass
class MergeRecord:
    """What `merge_into` changed: per site, the positions and the values they held before."""

    name: str
    saved: list = field(default_factory=list)  # (site key, rows i32[n] | None, cols | None, old values)


def _positions(m) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) in the kernel's [din, dout] indexing of a sparse module (scale folded)."""
    if m.kind == "sparse":
        m = m.folded()
        return m.cols.astype(np.int32), m.rows.astype(np.int32), m.values.astype(np.float32)
    m = m.split(m.block)
    b = m.block
    i, o = np.meshgrid(np.arange(b), np.arange(b), indexing="ij")
    rows = (m.col_blk[:, None, None] * b + i[None]).reshape(-1)
    cols = (m.row_blk[:, None, None] * b + o[None]).reshape(-1)
    return rows.astype(np.int32), cols.astype(np.int32), m.blocks.reshape(-1).astype(np.float32)


def merge_into(sites: dict, adapter: LoraAdapter) -> MergeRecord:
    """Add `adapter`'s delta into the kernels `sites` reaches; returns the record `unmerge` needs."""
    keys = sorted({*adapter.modules, *adapter.sparse})
    missing = [k for k in keys if k not in sites]
    if missing:
        raise AdapterError(f"cannot merge adapter {adapter.name!r}: layer {missing[0][0]} {missing[0][1]} is not a "
                           f"float kernel the engine shares with the model (quantized base weights cannot be "
                           f"merged into, nor weights placed anew for tensor or data parallelism)")
    record = MergeRecord(adapter.name)
    try:
        for key in keys:
            get, put = sites[key]
            if key in adapter.modules:  # a low-rank part touches every weight: save the kernel whole
                w = get()
                record.saved.append((key, None, None, jnp.array(w, copy=True)))
                m = adapter.modules[key]
                put(_add_dense(w, jnp.asarray(m.delta(), jnp.float32)))
            if key in adapter.sparse:
                rows, cols, vals = _positions(adapter.sparse[key])
                w = get()
                record.saved.append((key, rows, cols, _gather(w, rows, cols)))
                put(_scatter_add(w, rows, cols, vals))
    except BaseException:
        unmerge(sites, record)
        raise
    return record


def unmerge(sites: dict, record: MergeRecord) -> None:
    """Write back every value `merge_into` overwrote, last change first: the weights are again
    exactly what they were."""
    for key, rows, cols, old in reversed(record.saved):
        get, put = sites[key]
        put(_set_all(get(), old) if rows is None else _scatter_set(get(), rows, cols, old))
    record.saved.clear()


def stacked_site(get_stack, set_stack, layer: int):
    """A (get, set) site over layer `layer` of a stacked kernel [L, din, dout]."""

    def get():
        return get_stack()[layer]

    def put(value):
        set_stack(_set_layer(get_stack(), value, layer))

    return get, put


@_donating
def _set_layer(stack, value, layer):
    return stack.at[layer].set(value)
