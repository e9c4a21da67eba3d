"""GGUF (v2/v3) reading through the `gguf` package's reader, dequantized to float at load.

Dequantization uses `gguf.quants.dequantize` (vectorized numpy; it is the reference the tests
compare against, and it runs at roughly 100-400 MB/s of output per core here, a few seconds for a
0.6B model). Weights are kept as float on the device because XLA:CPU streams only f32 weights at
memory bandwidth (bf16/int8 operands are converted whole before the dot; see docs/cpu.md).

Tensor bytes are read with `os.pread` into a fresh buffer rather than through the reader's
memmap, so the file's pages never pile up in this process's resident memory: peak host memory
while loading stays near the final parameter bytes plus one tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError

# The types this loader promises (the list); anything else gguf can dequantize also works.
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class GGUFFile:
    """A GGUF file: `metadata` (key -> python value), tensor names, shapes and dequantized data."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFileError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except ValueError as e:
            msg = str(e)
            if "GGMLQuantizationType" in msg:
                raise ModelFileError(f"{self.path}: unknown GGUF tensor type ({msg})") from None
            raise ModelFileError(f"{self.path}: truncated or corrupt GGUF ({msg})") from None
        except (IndexError, OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{self.path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:
            end = t.data_offset + t.n_bytes
            if end > size:
                raise ModelFileError(f"{self.path}: truncated: tensor {t.name!r} ends at byte {end}, "
                                     f"file has {size}")
        self._metadata: dict[str, Any] | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        """Every key/value pair, strings decoded, arrays as lists (decoded once, then cached)."""
        if self._metadata is None:
            meta = {}
            for name, field in self._reader.fields.items():
                if name.startswith("GGUF."):
                    continue
                try:
                    meta[name] = field.contents()
                except UnicodeDecodeError as e:
                    raise ModelFileError(f"{self.path}: metadata key {name!r} is not valid UTF-8 ({e})") from None
            self._metadata = meta
        return self._metadata

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape in numpy/HF order (GGUF stores ggml order, innermost first)."""
        return tuple(int(x) for x in reversed(self._tensors[name].shape))

    def type_name(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as uint8 (a private copy, not a view of the file)."""
        t = self._tensors[name]
        buf = np.empty(t.n_bytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [memoryview(buf)], t.data_offset)
        if got != t.n_bytes:
            raise ModelFileError(f"{self.path}: truncated: tensor {name!r} is short by {t.n_bytes - got} bytes")
        return buf

    def get(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32 (F16/BF16/F32 converted), in numpy/HF shape."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        t = self._tensors[name]
        shape = self.shape(name)
        raw = self.raw(name)
        if t.tensor_type == Q.F32:
            return raw.view(np.float32).reshape(shape)
        if t.tensor_type == Q.F16:
            return raw.view(np.float16).reshape(shape).astype(np.float32)
        try:
            out = dequantize(raw.reshape(shape[:-1] + (-1,)), t.tensor_type)
        except NotImplementedError:
            raise ModelFileError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which cannot be "
                                 f"dequantized (supported: {', '.join(SUPPORTED)})") from None
        return out.astype(np.float32, copy=False).reshape(shape)
