"""Sparse adapter deltas on the host: element-sparse (PEFT's SHiRA) and block-sparse.

Both are additive deltas of a base weight, like LoRA's `scale * a @ b`, kept in the model's
[din, dout] layout but indexed the way PEFT and the `.vdb` files index the torch weight
[out, in]: an entry's *row* is its output index, its *column* its input index.

  * `SparseModule`: nnz entries (row, col, value): delta[col, row] += scale * value. PEFT's
    SHiRA stores exactly this per module (`shira_indices` int[2, nnz] as (row, col), and
    `shira_weight` [nnz]; scale 1). Duplicate positions add, as torch's sparse_coo does.
  * `BlockSparseModule`: nb blocks of b x b (b a multiple of 16): block j covers rows
    [row_blk[j] * b, +b) and columns [col_blk[j] * b, +b) of the torch weight, and holds them
    as `blocks[j]` f32[b_in, b_out] (the model's layout, what the kernel multiplies by). Blocks
    are kept sorted by (row block, column block) and unique.

A LoRA adapter may carry sparse modules beside its low-rank ones (`LoraAdapter.sparse`): that
is the low-rank + sparse kind (RoSA). The engine writes each part into its own slot table
(`registry.py`) and adds every part's delta per token (kernels/sparse.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseModule:
    rows: np.ndarray  # i32[nnz] output index (the torch weight's row)
    cols: np.ndarray  # i32[nnz] input index
    values: np.ndarray  # f32[nnz]
    shape: tuple[int, int]  # (din, dout) of the module
    scale: float = 1.0

    kind = "sparse"

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def params(self) -> int:
        return self.nnz

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.cols.nbytes + self.values.nbytes

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    def delta(self) -> np.ndarray:
        """The dense update [din, dout] in f64 (tests, merges, extraction)."""
        d = np.zeros(self.shape, np.float64)
        np.add.at(d, (self.cols, self.rows), self.values.astype(np.float64) * self.scale)
        return d

    def problem(self, din: int, dout: int) -> str | None:
        """Why this module does not fit a [din, dout] weight, or None."""
        if self.rows.shape != self.values.shape or self.cols.shape != self.values.shape or self.values.ndim != 1:
            return (f"indices {self.rows.shape}/{self.cols.shape} and values {self.values.shape} "
                    f"do not describe the same entries")
        if tuple(self.shape) != (din, dout):
            return (f"adapter is for a [{self.shape[1]} x {self.shape[0]}] weight, the model's is "
                    f"[{dout} x {din}] (out x in): not this base model")
        if self.nnz and (self.rows.min() < 0 or self.rows.max() >= dout or self.cols.min() < 0
                         or self.cols.max() >= din):
            return f"an index lies outside the [{dout} x {din}] weight"
        if not (np.isfinite(self.values).all() and np.isfinite(self.scale)):
            return "values or scale are not finite"
        return None

    def folded(self) -> SparseModule:
        """The same delta with the scale folded into the values (scale 1)."""
        if self.scale == 1.0:
            return self
        return SparseModule(self.rows, self.cols, (self.values * np.float32(self.scale)).astype(np.float32),
                            self.shape)


@dataclass
class BlockSparseModule:
    row_blk: np.ndarray  # i32[nb] output block index
    col_blk: np.ndarray  # i32[nb] input block index
    blocks: np.ndarray  # f32[nb, b, b]: [b_in, b_out], the model's layout
    shape: tuple[int, int]  # (din, dout)
    scale: float = 1.0

    kind = "block"

    @property
    def block(self) -> int:
        return int(self.blocks.shape[-1])

    @property
    def nblocks(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def params(self) -> int:
        return int(self.blocks.size)

    @property
    def nbytes(self) -> int:
        return self.row_blk.nbytes + self.col_blk.nbytes + self.blocks.nbytes

    @property
    def density(self) -> float:
        return self.params / (self.shape[0] * self.shape[1])

    def delta(self) -> np.ndarray:
        b = self.block
        din, dout = self.shape
        d = np.zeros((din // b, dout // b, b, b), np.float64)
        np.add.at(d, (self.col_blk, self.row_blk), self.blocks.astype(np.float64) * self.scale)
        return d.transpose(0, 2, 1, 3).reshape(din, dout)

    def problem(self, din: int, dout: int) -> str | None:
        b = self.block
        if self.blocks.ndim != 3 or self.blocks.shape[1] != b or self.row_blk.shape != (self.nblocks,) \
                or self.col_blk.shape != (self.nblocks,):
            return f"blocks {self.blocks.shape} and block indices {self.row_blk.shape} do not match"
        if b < 16 or b % 16:
            return f"block size {b} is not a multiple of 16"
        if tuple(self.shape) != (din, dout):
            return (f"adapter is for a [{self.shape[1]} x {self.shape[0]}] weight, the model's is "
                    f"[{dout} x {din}] (out x in): not this base model")
        if din % b or dout % b:
            return f"block size {b} does not divide the [{dout} x {din}] weight"
        if self.nblocks and (self.row_blk.min() < 0 or self.row_blk.max() >= dout // b or self.col_blk.min() < 0
                             or self.col_blk.max() >= din // b):
            return f"a block index lies outside the [{dout} x {din}] weight"
        key = self.row_blk.astype(np.int64) * (din // b) + self.col_blk
        if self.nblocks > 1 and not (np.diff(key) > 0).all():
            return "blocks are not sorted by (row block, column block) or repeat one"
        if not (np.isfinite(self.blocks).all() and np.isfinite(self.scale)):
            return "values or scale are not finite"
        return None

    def split(self, b: int) -> BlockSparseModule:
        """The same delta in blocks of b (which divides this block size), scale folded in."""
        f = self.block // b
        if f == 1 and self.scale == 1.0:
            return self
        nb = self.nblocks
        v = (self.blocks * np.float32(self.scale)).reshape(nb, f, b, f, b)  # [j, in_sub, b, out_sub, b]
        rows = (self.row_blk[:, None, None] * f + np.arange(f)[None, None, :])  # [j, in_sub, out_sub]
        cols = (self.col_blk[:, None, None] * f + np.arange(f)[None, :, None])
        v = v.transpose(0, 1, 3, 2, 4).reshape(nb * f * f, b, b)
        rows, cols = np.broadcast_to(rows, (nb, f, f)).reshape(-1), np.broadcast_to(cols, (nb, f, f)).reshape(-1)
        order = np.lexsort((cols, rows))
        return BlockSparseModule(rows[order].astype(np.int32), cols[order].astype(np.int32),
                                 np.ascontiguousarray(v[order], np.float32), self.shape)


def sparse_from_dense(delta: np.ndarray, nnz: int) -> SparseModule:
    """The `nnz` largest-magnitude entries of a dense [din, dout] delta (ties broken by position)."""
    din, dout = delta.shape
    flat = np.abs(np.asarray(delta, np.float64)).T.reshape(-1)  # row-major over (row=out, col=in)
    nnz = min(int(nnz), flat.size)
    keep = np.sort(np.argpartition(-flat, nnz - 1)[:nnz]) if nnz else np.zeros(0, np.int64)
    rows, cols = keep // din, keep % din
    return SparseModule(rows.astype(np.int32), cols.astype(np.int32),
                        np.asarray(delta, np.float32)[cols, rows], (din, dout))


def blocks_from_dense(delta: np.ndarray, nblocks: int, b: int = 16) -> BlockSparseModule:
    """The `nblocks` b x b blocks of largest Frobenius norm of a dense [din, dout] delta."""
    din, dout = delta.shape
    d = np.asarray(delta, np.float32).reshape(din // b, b, dout // b, b).transpose(2, 0, 1, 3)  # [rb, cb, b_in, b_out]
    norms = np.square(d.astype(np.float64)).sum(axis=(2, 3)).reshape(-1)
    nblocks = min(int(nblocks), norms.size)
    keep = np.sort(np.argpartition(-norms, nblocks - 1)[:nblocks]) if nblocks else np.zeros(0, np.int64)
    rows, cols = keep // (din // b), keep % (din // b)
    return BlockSparseModule(rows.astype(np.int32), cols.astype(np.int32),
                             np.ascontiguousarray(d[rows, cols], np.float32), (din, dout))
