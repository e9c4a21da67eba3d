"""Memory-mapped SafeTensors reading, one file or a sharded directory with an index JSON.

We parse the header ourselves instead of `safetensors.safe_open(framework="numpy")` because
numpy has no bfloat16 and that path refuses BF16 checkpoints; `ml_dtypes` gives us the dtype
and `np.memmap` gives zero-copy views, so a tensor is read from disk only when it is used.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import ModelFileError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


MAX_HEADER = 100_000_000  # the format's own limit on the JSON header (the safetensors library's)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class SafeTensorsFile:
    """One .safetensors file: `names()`, `shape(name)`, `get(name) -> np.ndarray` (a memmap view)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelFileError(f"{self.path}: not a SafeTensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER:
                    raise ModelFileError(f"{self.path}: SafeTensors header of {n:,} bytes is over the format's "
                                         f"limit of {MAX_HEADER:,}")
                if n > size - 8:
                    raise ModelFileError(f"{self.path}: truncated SafeTensors header ({n} bytes claimed, file is {size})")
                header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ModelFileError(f"{self.path}: corrupt SafeTensors header ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{self.path}: corrupt SafeTensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._info = header
        spans = []
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
                if not all(type(v) is int and v >= 0 for v in (*shape, start, end)):
                    raise ValueError("shape and offsets must be non-negative integers")
            except (KeyError, TypeError, ValueError):
                raise ModelFileError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                     f"{_show(info)} (shape and data_offsets must be non-negative integers)") from None
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise ModelFileError(f"{self.path}: tensor {name!r} has unsupported dtype {_show(dtype)}")
            if end < start:
                raise ModelFileError(f"{self.path}: tensor {name!r} has data_offsets [{start}, {end}]: negative length")
            if self._base + end > size:
                raise ModelFileError(f"{self.path}: truncated: tensor {name!r} ends at byte {self._base + end}, "
                                     f"file has {size}")
            want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize  # Python ints: no wrap-around
            if end - start != want:
                raise ModelFileError(f"{self.path}: tensor {name!r} spans {end - start} bytes, but shape {shape} "
                                     f"of {dtype} needs {want}")
            header[name] = dict(info, shape=shape)
            spans.append((start, end, name))
        at = 0  # the format: tensors tile the data section in order, no gaps and no overlaps
        for start, end, name in sorted(spans):
            if start != at:
                kind = "overlaps the tensor before it" if start < at else f"leaves a gap of {start - at} bytes"
                raise ModelFileError(f"{self.path}: tensor {name!r} at data_offsets [{start}, {end}] {kind} "
                                     "(SafeTensors data must be contiguous)")
            at = end
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        info = self._info[name]
        start, end = info["data_offsets"]
        raw = self._mmap[self._base + start:self._base + end]
        array = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        return array if rows is None else array[rows[0]:rows[1]]


class SafeTensorsDir:
    """All tensors of a HF model directory (`model.safetensors` or shards + `*.index.json`)."""

    def __init__(self, directory: str | os.PathLike):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ModelFileError(f"{index}: not a valid index (needs a 'weight_map' object: {e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (d / f).exists()]
            if missing:
                raise ModelFileError(f"{index}: names shard files that are missing: {', '.join(missing)}")
            self._files = {f: SafeTensorsFile(d / f) for f in files}
            self._where = {name: self._files[f] for name, f in weight_map.items()}
        else:
            files = sorted(d.glob("*.safetensors"))
            if not files:
                raise ModelFileError(f"{d}: no *.safetensors weights in this directory")
            self._where = {}
            for f in files:
                st = SafeTensorsFile(f)
                self._where.update({name: st for name in st.names()})

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self._where[name].get(name, rows)

    def where(self, name: str) -> Path:
        return self._where[name].path
