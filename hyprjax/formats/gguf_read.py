"""GGUF (v2/v3) reading: our own header parser, the `gguf` package's dequantizers.

Dequantization uses `gguf.quants.dequantize` (vectorized numpy; it is the reference the tests
compare against, and it runs at roughly 100-400 MB/s of output per core here, a few seconds for a
0.6B model). Weights are kept as float on the device because XLA:CPU streams only f32 weights at
memory bandwidth (bf16/int8 operands are converted whole before the dot; see docs/cpu.md).

Tensor bytes are read with `os.pread` into a fresh buffer rather than through the reader's
memmap, so the file's pages never pile up in this process's resident memory: peak host memory
while loading stays near the final parameter bytes plus one tensor.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..errors import ModelFileError

# The types this loader promises (the list); anything else gguf can dequantize also works.
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class GGUFFile:
    """A GGUF file: `metadata` (key -> python value), tensor names, shapes and dequantized data.

    The header is parsed here rather than by `gguf.GGUFReader`, which builds a numpy view per
    array element and takes ~12 s on a 262k-token vocabulary; this parser takes ~0.1 s.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ModelFileError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
            try:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self.metadata, infos, end = _parse_header(buf, self.path)
            except ModelFileError:
                raise
            except (struct.error, ValueError, IndexError, OverflowError, MemoryError) as e:
                raise ModelFileError(f"{self.path}: truncated or corrupt GGUF header ({e})") from None
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ModelFileError(f"{self.path}: general.alignment={align!r} must be a positive power of two")
        base = -(-end // align) * align
        self._tensors: dict[str, _TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise ModelFileError(f"{self.path}: tensor {name!r} has an unknown GGUF tensor type {type_id}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            shape = tuple(reversed(dims))  # GGUF lists dims innermost first
            if dims[0] % block:
                raise ModelFileError(f"{self.path}: tensor {name!r} row of {dims[0]} is not a multiple of "
                                     f"{qtype.name}'s block of {block}")
            n_bytes = math.prod(dims) // block * type_size  # Python ints: a huge count cannot wrap around
            start = base + offset
            if start + n_bytes > size:
                raise ModelFileError(f"{self.path}: truncated: tensor {name!r} ends at byte {start + n_bytes}, "
                                     f"file has {size}")
            self._tensors[name] = _TensorInfo(shape, qtype, start, n_bytes)

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape in numpy/HF order (GGUF stores ggml order, innermost first)."""
        return self._tensors[name].shape

    def type_name(self, name: str) -> str:
        return self._tensors[name].qtype.name

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor's stored bytes (of rows [r0, r1) when given) as uint8: a private copy, not a view."""
        t = self._tensors[name]
        row_bytes = t.n_bytes // max(1, int(np.prod(t.shape[:-1])))
        r0, r1 = rows if rows is not None else (0, t.n_bytes // row_bytes)
        n = (r1 - r0) * row_bytes
        buf = np.empty(n, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [memoryview(buf)], t.offset + r0 * row_bytes)
        if got != n:
            raise ModelFileError(f"{self.path}: truncated: tensor {name!r} is short by {n - got} bytes")
        return buf

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or rows [r0, r1) of its first axis) dequantized to float32, in numpy/HF shape."""
        t = self._tensors[name]
        shape = t.shape if rows is None else (rows[1] - rows[0], *t.shape[1:])
        raw = self.raw(name, rows)
        if t.qtype == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape)
        if t.qtype == GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(shape).astype(np.float32)
        try:
            out = dequantize(raw.reshape(shape[:-1] + (-1,)), t.qtype)
        except NotImplementedError:
            raise ModelFileError(f"{self.path}: tensor {name!r} has type {t.qtype.name}, which cannot be "
                                 f"dequantized (supported: {', '.join(SUPPORTED)})") from None
        return out.astype(np.float32, copy=False).reshape(shape)


class _TensorInfo(NamedTuple):
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int


MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays in metadata (real files use one level)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _parse_header(buf, path) -> tuple[dict[str, Any], list[tuple], int]:
    """(metadata, [(name, dims, type id, offset)], end of header) of a GGUF v2/v3 file."""
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    for what, count, least in (("tensor", n_tensors, 8 + 4 + 8 + 12), ("metadata key", n_kv, 8 + 4)):
        if count * least > len(buf):  # every entry takes at least `least` bytes
            raise ModelFileError(f"{path}: truncated or corrupt GGUF header (a {what} count of {count:,} cannot "
                                 f"fit in a file of {len(buf):,} bytes)")
    pos, meta = 24, {}
    for _ in range(n_kv):
        key, pos = _read_str(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        try:
            meta[key], pos = _read_value(buf, pos + 4, vtype)
        except UnicodeDecodeError as e:
            raise ModelFileError(f"{path}: metadata key {key!r} is not valid UTF-8 ({e})") from None
    infos = []
    for _ in range(n_tensors):
        name, pos = _read_str(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFileError(f"{path}: tensor {name!r} has n_dims={n_dims} (GGUF tensors have 1 to {MAX_DIMS})")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        if 0 in dims:
            raise ModelFileError(f"{path}: tensor {name!r} has a dimension of 0 ({list(dims)})")
        type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims, type_id, offset))
    return meta, infos, pos


def _read_str(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    if end > len(buf):
        raise ValueError(f"a string at byte {pos} runs past the end of the file")
    return buf[pos + 8:end].decode("utf-8"), end


def _read_value(buf, pos: int, vtype: int, depth: int = 0) -> tuple[Any, int]:
    if vtype in _SCALAR:
        (value,) = struct.unpack_from(_SCALAR[vtype], buf, pos)
        return value, pos + struct.calcsize(_SCALAR[vtype])
    if vtype == _STRING:
        return _read_str(buf, pos)
    if vtype != _ARRAY:
        raise ValueError(f"unknown metadata value type {vtype} at byte {pos}")
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if depth >= MAX_NESTING:
        raise ValueError(f"metadata arrays nested more than {MAX_NESTING} deep at byte {pos}")
    if etype not in _SCALAR and etype not in (_STRING, _ARRAY):
        raise ValueError(f"unknown metadata array element type {etype} at byte {pos}")
    least = struct.calcsize(_SCALAR[etype]) if etype in _SCALAR else 8 if etype == _STRING else 12
    if pos + count * least > len(buf):
        raise ValueError(f"an array of {count:,} entries at byte {pos} runs past the end of the file")
    if etype in _SCALAR and etype != 7:  # numbers: one numpy call; tolist() so no view outlives the mmap
        dtype = np.dtype(_SCALAR[etype])
        if pos + count * dtype.itemsize > len(buf):
            raise ValueError(f"an array at byte {pos} runs past the end of the file")
        return np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist(), pos + count * dtype.itemsize
    out = []
    for _ in range(count):  # strings (a vocabulary, merges), bools, nested arrays
        value, pos = _read_value(buf, pos, etype, depth + 1)
        out.append(value)
    return out, pos
