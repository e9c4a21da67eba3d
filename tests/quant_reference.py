"""The reference quantizers the quantization tests check against, written from the spec alone in
numpy (hyprjax/qformat.py is the code under test): round half to even, float32 arithmetic.

int8: symmetric, one scale per row, max |row| / 127.
int4: asymmetric, groups of 32 along the row, an f16 scale (max - min) / 15 and an f16 minimum;
      codes 0..15, w = code * scale + min. A width that is no multiple of 32 falls back to int8.
"""

from __future__ import annotations

import numpy as np


def fake_quant(w: np.ndarray, mode: str) -> np.ndarray:
    """Each row of w f[rows, width] quantized to `mode` and back."""
    w = np.asarray(w, np.float32)
    rows, width = w.shape
    if mode == "int4" and width % 32 == 0:
        g = w.reshape(rows, width // 32, 32)
        lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
        scale = np.where(hi > lo, (hi - lo) / np.float32(15), np.float32(1)).astype(np.float16).astype(np.float32)
        low = lo.astype(np.float16).astype(np.float32)
        codes = np.clip(np.round((g - low) / scale), 0, 15)
        return (codes * scale + low).astype(np.float32).reshape(rows, width)
    s = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
    s = np.where(s > 0, s, np.float32(1))
    return (np.clip(np.round(w / s), -127, 127) * s).astype(np.float32)
