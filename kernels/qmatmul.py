"""x @ w.T for a quantized matrix `w` (hyprjax/qformat.py), dequantized tile by tile on chip.

    out f32[M, dout] = x f[M, din] @ dequantize(fmt, q).T

The kernels read the packed codes and the small scale arrays of `q` as they are laid out on the
device and rebuild weights in registers (GPU) or VMEM (TPU); the float matrix never exists in
HBM, so a decode step reads 1 (int8), ~0.5 (4-bit) or 2 (bits 16: f16/bf16 codes, times a
per-row unit scale if present) bytes per weight.

4-bit codes: GGML packs byte j of each 32-weight block with weight j (low nibble) and j + 16
(high). Rather than interleaving unpacked nibbles in the kernel, the wrapper splits x's columns
the same way, x_lo[:, 16b + j] = x[:, 32b + j] and x_hi[:, 16b + j] = x[:, 32b + 16 + j] (a copy
of x, cheap next to the weights at decode sizes), so a chunk of bytes v contributes
x_lo @ (v & 15).T + x_hi @ (v >> 4).T. Work is then in "code columns" (bytes for 4-bit): a group
of `group` weights is group / 2 bytes wide when group % 32 == 0 (both nibbles of a byte share
it); with group 16 the low nibbles of a block belong to group 2b and the high ones to 2b + 1,
so each half reads every other group's scale (`mult` = 2 below).

Scales are applied one of two ways per din chunk of `bk` code columns:
  A. the chunk lies inside one group (per-channel int8 or bits 16, group 96; with f32 x also
     Q8_0 and int4, in 32-column chunks): dot the raw codes (integers are exact in bf16/f16)
     and scale the f32 [bm, bn] product by the group's s[o] (plus rowsum(x_chunk) * m[o] for a
     min): no per-weight work, and exact up to summation order whatever x's dtype;
  B. the chunk holds ng = bk / gc whole groups (Q4_K, Q6_K, Q2_K/Q3_K; with bf16 x also Q8_0 and
     int4, in 128-column chunks): the per-group factors are built as f32 [bn, ng] and broadcast
     over the tile as v.reshape(bn, ng, gc) * s[:, :, None] (GPU) or, transposed,
     vT.reshape(ng, gc, bn) * s[:, None, :] (TPU: groups on sublanes), and the tile is cast to
     the dot dtype; with bf16 x that rounds the weights to bf16, as a bf16 matmul of the
     dequantized matrix would. A `scale`/`min` entry covering `ratio` groups is broadcast over
     them in registers; sub-scales (uint8/int8) are read as stored, so Q4_K stays 4.6 bits.
The dot runs in x's dtype when that is bf16/f16 (tensor cores / MXU, f32 accumulation) and in
full f32 (IEEE on GPU, HIGHEST on TPU) when x is f32 (or bits 16 codes differ from x's dtype).

GPU (Triton; interpret=True on CPU runs this one): grid (M block, dout block, din split); each
program loops over its share of din in chunks of bk, loading code and scale columns with `pl.ds`
(strided for `mult` 2), and stores an f32 partial sum that the wrapper adds up: split-K fills
the ~132 SMs at decode shapes (M = 1 has one M block and dout / bn column blocks)
deterministically, without atomics, while the partial sums written stay under 1/8 of the code
bytes read. Tiles are powers of two >= 16 (Triton): bm = M rounded up, 16..64; bn = 64; bk =
128 code columns. With f32 x they are bm <= 32 and bk = 32: Triton's f32 dot is an FMA loop
holding both operands in registers, and 128-wide chunks spilled (ptxas, sm_90). Path B needs
power-of-two groups (16/32/64 code columns); path A takes bk as a power-of-two divisor of the
group's width (4-bit group 96: 48 bytes -> bk 16). num_warps 4, num_stages 3: <= 135 KiB of
shared memory at bm 64 (4-bit, bf16), ~30 KiB at decode sizes.

TPU (Mosaic): grid (M block, dout block, din chunk "arbitrary"), the f32 output block resident
across chunks. bm is M rounded up to 16 rows (bf16 sublanes), bn 256 or 128 lanes (or all of
dout), bk 512 weights (a multiple of 128 code columns dividing din, or all of it) cutting no
scale row. Scale arrays are re-laid out per call as f32 [G, dout], groups on sublanes, and
reshaped so that a chunk's rows are one BlockSpec block: the narrow lane slices Mosaic cannot
take become block indices. That copy reads and writes the scale arrays once per call (~15% of
Q4_K's bytes); storing them so at load would remove it.

Verified on CPU only: both kernels against `reference` in interpret mode (TPU interpret mode for
the TPU one), both lowerings (Triton IR, Mosaic MLIR) in tests, and the Triton IR of every tested
format x {f32, bf16} x M {1, 16, 40} compiled offline to sm_90 cubins (Triton 3.6, ptxas 13.0)
without register spills. Not verified: results and speed on a GPU (the gpu-marked test and
`python -m hyprjax.kernels.qmatmul --bench` check them), JAX's own bundled Triton, and the Mosaic TPU
compile (in-kernel transposes, sublane reshapes, uint8 -> int32) and speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hyprjax.qformat import NIBBLE_BLOCK, QFormat, dequantize

_SQ = pl.squeezed
_HIGHEST = lax.Precision.HIGHEST
_FACTORS = ("scale", "sub", "min", "msub")  # the per-group arrays, in kernel argument order
_BACKENDS = ("gpu", "tpu")


def _check(x, fmt: QFormat, q: dict) -> tuple[int, int, int]:
    """(M, din, dout) of a valid call; ValueError/TypeError naming the bad argument otherwise."""
    if not isinstance(fmt, QFormat):
        raise TypeError(f"qmatmul: fmt={fmt!r} must be a QFormat")
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"qmatmul: x {x.dtype}{list(x.shape)} must be a float [M, din]")
    codes = q.get("codes")
    if codes is None or codes.ndim != 2:
        raise ValueError(f"qmatmul: q['codes'] must be [dout, din] (halved for 4-bit), got "
                         f"{None if codes is None else codes.shape}")
    din, dout = x.shape[1], codes.shape[0]
    want = {4: (jnp.uint8,), 8: (jnp.int8,), 16: (jnp.float16, jnp.bfloat16)}[fmt.bits]
    if codes.shape != fmt.code_shape(dout, din) or codes.dtype not in want:
        raise ValueError(f"qmatmul: q['codes'] {codes.dtype}{list(codes.shape)} does not fit x's "
                         f"din={din} and bits={fmt.bits} (want {want[0].__name__}"
                         f"{list(fmt.code_shape(dout, din))})")
    if fmt.bits == 4 and din % NIBBLE_BLOCK:
        raise ValueError(f"qmatmul: 4-bit din={din} must be a multiple of {NIBBLE_BLOCK}")
    present = [k for k in _FACTORS if q.get(k) is not None]
    if fmt.bits == 16 and not present:  # the half floats alone (a unit scale is optional)
        return x.shape[0], din, dout
    if din % fmt.group or (din // fmt.group) % fmt.ratio:
        raise ValueError(f"qmatmul: din={din} is not a whole number of groups of {fmt.group} "
                         f"x ratio {fmt.ratio}")
    if q.get("msub") is not None and q.get("min") is None:
        raise ValueError("qmatmul: q['msub'] needs q['min']")
    ng = din // fmt.group
    for k in present:
        a, cols = q[k], ng // fmt.ratio if k in ("scale", "min") else ng
        if a.shape != (dout, cols):
            raise ValueError(f"qmatmul: q[{k!r}].shape={a.shape}, want {(dout, cols)}")
        kinds = "f" if k in ("scale", "min") else "iuf"
        if jnp.dtype(a.dtype).kind not in kinds:
            raise ValueError(f"qmatmul: q[{k!r}].dtype={a.dtype} is not allowed here")
    if "scale" not in present:
        raise ValueError("qmatmul: q['scale'] is required for bits 4 and 8")
    return x.shape[0], din, dout


def reference(x, fmt: QFormat, q: dict) -> jax.Array:
    """f32[M, dout] = x @ dequantize(fmt, q).T in jnp, full f32 (no TF32/bf16 passes)."""
    _check(x, fmt, q)
    if q.get("scale") is None:  # bits 16 without its unit scale
        w = q["codes"].astype(jnp.float32)
    else:
        w = dequantize(fmt, q)
    return jnp.dot(x.astype(jnp.float32), w.T, precision=_HIGHEST)


ref_qmatmul = reference  # the repo's `ref_<kernel>` name


# --- shared pieces ------------------------------------------------------------------------------

def _code_groups(fmt: QFormat) -> tuple[int, int]:
    """(gc, mult): a group's width in code columns, and the group-index step between them."""
    if fmt.bits != 4:
        return fmt.group, 1
    if fmt.group % NIBBLE_BLOCK == 0:
        return fmt.group // 2, 1
    if fmt.group == 16:
        return 16, 2  # block b: low nibbles in group 2b, high nibbles in 2b + 1
    raise NotImplementedError(f"qmatmul: bits 4 with group={fmt.group} (not 16 or a multiple "
                              "of 32) straddles nibble blocks")


def _halves(fmt: QFormat, v):
    """A chunk of codes -> its integer values per x half (low, high nibbles for 4-bit)."""
    if fmt.bits != 4:
        return [v]
    u = v.astype(jnp.int32)
    return [(u & 0xF) - fmt.zero, (u >> 4) - fmt.zero]


def _split_x(x, fmt: QFormat, rows: int):
    """x padded to `rows` rows, as one array or its (low, high) nibble-order halves."""
    x = jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))
    if fmt.bits != 4:
        return [x]
    blocks = x.reshape(rows, -1, 2, NIBBLE_BLOCK // 2)
    return [blocks[:, :, 0].reshape(rows, -1), blocks[:, :, 1].reshape(rows, -1)]


def _dot_dtype(x_dtype, fmt: QFormat, codes_dtype):
    if fmt.bits == 16:
        return jnp.promote_types(x_dtype, codes_dtype)
    return x_dtype if x_dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def _dot(a, b, dd, contract_b: int):
    """f32 a[m, k] . b (b[n, k] with contract_b=1, b[k, n] with 0), both cast to dd."""
    return lax.dot_general(a.astype(dd), b.astype(dd), (((1,), (contract_b,)), ((), ())),
                           precision=_HIGHEST if dd == jnp.float32 else None,
                           preferred_element_type=jnp.float32)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    return min(n & -n, 1 << (cap.bit_length() - 1))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- GPU (Triton) -------------------------------------------------------------------------------

def _gpu_factor(main, sub, g0, ng, mult, ratio, bn):
    """f32[bn, ng]: main[:, G // ratio] * sub[:, G] for the groups G = g0 + mult * i."""
    if ratio == 1:
        out = main[:, pl.ds(g0, ng, stride=mult)].astype(jnp.float32)
    elif ng * mult >= ratio:  # whole super-blocks: each main column repeats ratio / mult times
        per = ratio // mult
        out = main[:, pl.ds(lax.div(g0, ratio), ng // per)].astype(jnp.float32)
        out = jnp.broadcast_to(out[:, :, None], (bn, ng // per, per)).reshape(bn, ng)
    else:
        out = jnp.broadcast_to(main[:, pl.ds(lax.div(g0, ratio), 1)].astype(jnp.float32),
                               (bn, ng))
    if sub is not None:
        out = out * sub[:, pl.ds(g0, ng, stride=mult)].astype(jnp.float32)
    return out


def _gpu_kernel(*refs, fmt, names, bk, steps, whole, dd):
    """Program (i, j, s): o[s] = x[i block] @ w[j block].T over din chunks [s*steps, (s+1)*steps).

    whole: the chunk holds whole groups (path B); else it lies inside one group (path A).
    """
    nh = 2 if fmt.bits == 4 else 1
    x_refs, c_ref, o_ref = refs[:nh], refs[nh], refs[-1]
    f = dict(zip(names, refs[nh + 1:-1]))
    bm, bn = o_ref.shape
    gc, mult = _code_groups(fmt) if f else (bk, 1)

    def body(t, acc):
        c0 = pl.multiple_of(t * bk, bk)
        cols = pl.ds(c0, bk)
        for h, v in enumerate(_halves(fmt, c_ref[:, cols])):
            xc = x_refs[h][:, cols]
            if not f:  # bits 16 without a scale
                acc += _dot(xc, v, dd, 1)
            elif whole:  # path B: scale the tile per group
                ng = bk // gc
                g0 = lax.div(c0, gc) * mult + (h if mult == 2 else 0)
                s = _gpu_factor(f["scale"], f.get("sub"), g0, ng, mult, fmt.ratio, bn)
                w = v.astype(jnp.float32).reshape(bn, ng, gc) * s[:, :, None]
                if "min" in f:
                    m = _gpu_factor(f["min"], f.get("msub"), g0, ng, mult, fmt.ratio, bn)
                    w = w + m[:, :, None]
                acc += _dot(xc, w.reshape(bn, bk), dd, 1)
            else:  # path A: one group; scale the product
                g = lax.div(c0, gc)
                s = _gpu_factor(f["scale"], f.get("sub"), g, 1, 1, fmt.ratio, bn)
                acc += _dot(xc, v, dd, 1) * s.reshape(1, bn)
                if "min" in f:
                    m = _gpu_factor(f["min"], f.get("msub"), g, 1, 1, fmt.ratio, bn)
                    xs = jnp.sum(xc.astype(jnp.float32), axis=1)
                    acc += xs[:, None] * m.reshape(1, bn)
        return acc

    s_idx = pl.program_id(2)
    o_ref[...] = lax.fori_loop(s_idx * steps, (s_idx + 1) * steps, body,
                               jnp.zeros((bm, bn), jnp.float32))


def _gpu_chunk(fmt: QFormat, din_c: int, cap: int, scaled: bool) -> tuple[int, bool]:
    """(bk code columns per chunk, whole groups per chunk?) for Triton's power-of-two tiles."""
    if not scaled:
        bk, whole = _pow2_divisor(din_c, cap), False
    else:
        gc, mult = _code_groups(fmt)
        if _pow2(gc) and (gc < cap or mult == 2):
            bk, whole = _pow2_divisor(din_c, max(cap, gc)), True
            ratio = fmt.ratio
            if ratio > 1 and (not _pow2(ratio) or ratio < mult):
                raise NotImplementedError(f"qmatmul (GPU): ratio={ratio} with group {fmt.group}")
        else:
            bk, whole = _pow2_divisor(gc, cap), False
    if bk < 16:
        raise NotImplementedError(f"qmatmul (GPU): {fmt} gives din chunks of {bk} code columns; "
                                  "Triton's dot needs >= 16")
    return bk, whole


def _gpu_splits(nk: int, programs: int, bm: int, row_bytes: int) -> int:
    """Split-K factor: the least divisor of the nk chunks that gives ~128 programs (H100: 132
    SMs), keeping >= 2 chunks per split and the f32 partial sums written (splits * bm * 4 bytes
    per output column) under 1/8 of the code bytes read per column."""
    best = 1
    for s in range(2, nk // 2 + 1):
        if nk % s or s * bm * 4 * 8 > row_bytes:
            continue
        if programs * best >= 128:
            break
        best = s
    return best


def _triton_params():
    """Pin the Triton lowering (JAX 0.10's GPU default; deprecated, still present, in 0.11)."""
    from jax.experimental.pallas import triton as pltriton  # lazy: warns on JAX >= 0.11

    return pltriton.CompilerParams(num_warps=4, num_stages=3)


def _qmatmul_gpu(x, fmt, q, *, block_m=None, block_n=None, block_k=None, splits=None,
                 interpret=False):
    m, din, dout = _check(x, fmt, q)
    codes = q["codes"]
    din_c = codes.shape[1]
    names = tuple(k for k in _FACTORS if q.get(k) is not None)
    dd = _dot_dtype(x.dtype, fmt, codes.dtype)
    # f32 dots are IEEE FMA loops holding both operands in registers: past [32, 32] x [32, 64]
    # they spill (ptxas, sm_90). bf16/f16 dots run on the tensor cores.
    f32 = dd == jnp.float32
    bm = block_m or min(32 if f32 else 64, max(16, pl.next_power_of_2(m)))
    bn = block_n or _pow2_divisor(dout, 64)
    for name, value in (("block_m", bm), ("block_n", bn)):
        if value < 16 or not _pow2(value):
            raise NotImplementedError(f"qmatmul (GPU): {name}={value} must be a power of two "
                                      f">= 16 (dout={dout})")
    if dout % bn:
        raise ValueError(f"qmatmul: block_n={bn} must divide dout={dout}")
    bk, whole = _gpu_chunk(fmt, din_c, block_k or (32 if f32 else 128), bool(names))
    nk, mb = din_c // bk, pl.cdiv(m, bm)
    if splits is None:
        splits = _gpu_splits(nk, mb * (dout // bn), bm, din_c * codes.dtype.itemsize)
    if nk % splits:
        raise ValueError(f"qmatmul: splits={splits} must divide the {nk} din chunks")
    xs = _split_x(x, fmt, mb * bm)
    kernel = functools.partial(_gpu_kernel, fmt=fmt, names=names, bk=bk, steps=nk // splits,
                               whole=whole, dd=dd)
    out = pl.pallas_call(
        kernel,
        grid=(mb, dout // bn, splits),
        in_specs=[*[pl.BlockSpec((bm, din_c), lambda i, j, s: (i, 0))] * len(xs),
                  pl.BlockSpec((bn, din_c), lambda i, j, s: (j, 0)),
                  *[pl.BlockSpec((bn, q[k].shape[1]), lambda i, j, s: (j, 0)) for k in names]],
        out_specs=pl.BlockSpec((_SQ, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mb * bm, dout), jnp.float32),
        compiler_params=None if interpret else _triton_params(),
        interpret=interpret,
        name="qmatmul",
    )(*xs, codes, *(q[k] for k in names))
    return out[:, :m].sum(0)


# --- TPU (Mosaic) -------------------------------------------------------------------------------

def _tpu_rows(a, ng: int):
    """f32[r, bn] factor rows -> [ng, bn], each row repeated over the ng / r groups it covers."""
    r, bn = a.shape
    return a if r == ng else jnp.broadcast_to(a[:, None, :], (r, ng // r, bn)).reshape(ng, bn)


def _tpu_kernel(*refs, fmt, names, dd):
    """Step (i, j, k): o[i, j] += x[i, chunk k] @ w[j, chunk k].T; o stays in VMEM over k."""
    nh = 2 if fmt.bits == 4 else 1
    x_refs, c_ref, o_ref = refs[:nh], refs[nh], refs[-1]
    f = {k: r[...] for k, r in zip(names, refs[nh + 1:-1])}  # f32[rows of this chunk, bn]
    bn, bk = c_ref.shape  # bk code columns

    @pl.when(pl.program_id(2) == 0)
    def _zero():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    s = m = None
    if f:  # per-group factors f32[ng, bn], ng = groups (or super-blocks) in the chunk
        ng = max(a.shape[0] for a in f.values())
        s = _tpu_rows(f["scale"], ng)
        if "sub" in f:
            s = s * _tpu_rows(f["sub"], ng)
        if "min" in f:
            m = _tpu_rows(f["min"], ng)
            if "msub" in f:
                m = m * _tpu_rows(f["msub"], ng)
    acc = o_ref[...]
    for h, v in enumerate(_halves(fmt, c_ref[...])):
        x = x_refs[h][...]
        if not f:  # bits 16 without a scale
            acc += _dot(x, v, dd, 1)
            continue
        sh, mh = s, m
        if _code_groups(fmt)[1] == 2:  # 4-bit group 16: this half's groups are every other row
            g = s.shape[0]
            pick = (lax.broadcasted_iota(jnp.int32, (g // 2, g), 1)
                    == 2 * lax.broadcasted_iota(jnp.int32, (g // 2, g), 0) + h)
            pick = pick.astype(jnp.float32)  # an exact row gather, on the MXU
            sh = _dot(pick, s, jnp.float32, 0)
            mh = None if m is None else _dot(pick, m, jnp.float32, 0)
        g = sh.shape[0]
        if g == 1:  # path A
            acc += _dot(x, v, dd, 1) * sh
            if mh is not None:
                acc += jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) * mh
        else:  # path B, groups on sublanes
            w = v.astype(jnp.float32).T.reshape(g, bk // g, bn) * sh[:, None, :]
            if mh is not None:
                w = w + mh[:, None, :]
            acc += _dot(x, w.reshape(bk, bn), dd, 0)
    o_ref[...] = acc


def _tpu_chunk(fmt: QFormat, din_c: int, cap: int, scaled: bool) -> int:
    """Code columns per chunk: a multiple of 128 lanes (or all of din) that cuts no factor row
    and, holding several groups, splits into groups of whole 8-row sublane tiles."""
    nh = 2 if fmt.bits == 4 else 1
    for c in [c for c in range(cap - cap % 128, 0, -128) if din_c % c == 0] + [din_c]:
        if not scaled:
            return c
        bk = c * nh
        if (all(bk % cov == 0 or cov % bk == 0 for cov in (fmt.group, fmt.group * fmt.ratio))
                and (bk <= fmt.group or _code_groups(fmt)[0] % 8 == 0)):
            return c
    raise NotImplementedError(f"qmatmul (TPU): no din chunk of {din_c} code columns fits {fmt}")


def _tpu_factor(a, cover: int, bk: int, din: int, dout: int, bn: int):
    """a [dout, din // cover] -> (f32 array, BlockSpec) giving chunk k's rows as [rows, bn]."""
    at = a.astype(jnp.float32).T
    if bk >= cover:
        rows = bk // cover
        return (at.reshape(din // bk, rows, dout),
                pl.BlockSpec((_SQ, rows, bn), lambda i, j, k: (k, 0, j)))
    per = cover // bk
    return (at.reshape(din // cover, 1, dout),
            pl.BlockSpec((_SQ, 1, bn), lambda i, j, k: (k // per, 0, j)))


def _qmatmul_tpu(x, fmt, q, *, block_m=None, block_n=None, block_k=None, interpret=False):
    from jax.experimental.pallas import tpu as pltpu

    m, din, dout = _check(x, fmt, q)
    codes = q["codes"]
    din_c = codes.shape[1]
    names = tuple(k for k in _FACTORS if q.get(k) is not None)
    bm = block_m or min(256, -(-m // 16) * 16)  # whole bf16 sublane tiles
    # [bn, bk] f32 temporaries (codes, their transpose, the scaled tile; twice for 4-bit) stay
    # near 0.5 MiB each, well inside the default scoped VMEM.
    bn = block_n or next((c for c in (256, 128) if dout % c == 0), dout)
    bkc = block_k or _tpu_chunk(fmt, din_c, 512 // (din // din_c), bool(names))
    if dout % bn or din_c % bkc or bm % 16:
        raise ValueError(f"qmatmul (TPU): block_m={bm} (multiple of 16), block_n={bn} "
                         f"(dividing dout={dout}), block_k={bkc} (dividing {din_c}) do not fit")
    bk, mb = bkc * (din // din_c), pl.cdiv(m, bm)
    xs = _split_x(x, fmt, mb * bm)
    factors = [_tpu_factor(q[k], fmt.group * (fmt.ratio if k in ("scale", "min") else 1),
                           bk, din, dout, bn) for k in names]
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, fmt=fmt, names=names,
                          dd=_dot_dtype(x.dtype, fmt, codes.dtype)),
        grid=(mb, dout // bn, din_c // bkc),
        in_specs=[*[pl.BlockSpec((bm, bkc), lambda i, j, k: (i, k))] * len(xs),
                  pl.BlockSpec((bn, bkc), lambda i, j, k: (j, k)),
                  *[spec for _, spec in factors]],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mb * bm, dout), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="qmatmul_tpu",
    )(*xs, codes, *(a for a, _ in factors))
    return out[:m]


# --- public -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("fmt", "interpret", "backend", "block_m", "block_n",
                                             "block_k", "splits"))
def qmatmul(x, fmt: QFormat, q: dict, *, interpret: bool = False, backend: str | None = None,
            block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
            splits: int | None = None) -> jax.Array:
    """f32[M, dout] = x f[M, din] @ dequantize(fmt, q).T by a Pallas kernel (module docstring).

    backend: "gpu" (Triton), "tpu" (Mosaic) or None for the platform's (TPU on TPU, else GPU;
    on CPU only interpret=True runs, interpreting the chosen kernel). Block sizes default per
    backend; block_k counts code columns (bytes for 4-bit); splits (GPU only) cuts din into that
    many partial sums.
    """
    backend = backend or ("tpu" if jax.default_backend() == "tpu" else "gpu")
    if backend not in _BACKENDS:
        raise ValueError(f"qmatmul: backend={backend!r} must be one of {_BACKENDS} or None")
    if not interpret and jax.default_backend() == "cpu":
        raise ValueError("qmatmul: interpret=False needs a GPU or TPU; pass interpret=True on CPU")
    blocks = dict(block_m=block_m, block_n=block_n, block_k=block_k, interpret=interpret)
    if backend == "tpu":
        if splits is not None:
            raise ValueError(f"qmatmul: splits={splits} is for backend='gpu' only")
        return _qmatmul_tpu(x, fmt, q, **blocks)
    return _qmatmul_gpu(x, fmt, q, splits=splits, **blocks)


# --- benchmark: python -m hyprjax.kernels.qmatmul --bench ---------------------------------------

_BENCH_FORMATS = {  # name -> (format for a din, factor dtypes); as tests/test_qmatmul.py
    "int8": (lambda din: QFormat(8, din), dict(scale="float32")),
    "int4": (lambda din: QFormat(4, 128, zero=8), dict(scale="float32")),
    "Q4_K": (lambda din: QFormat(4, 32, ratio=8),
             dict(scale="float16", sub="uint8", min="float16", msub="uint8")),
    "Q6_K": (lambda din: QFormat(8, 16, ratio=16), dict(scale="float16", sub="int8")),
    "Q8_0": (lambda din: QFormat(8, 32), dict(scale="float16")),
    "f16": (lambda din: QFormat(16, din), dict(scale="float32")),
}


def _random_q(rng, fmt: QFormat, dtypes: dict, dout: int, din: int) -> dict:
    import numpy as np

    from hyprjax.qformat import pack_nibbles

    if fmt.bits == 4:
        q = dict(codes=pack_nibbles(rng.integers(0, 16, (dout, din))))
    elif fmt.bits == 8:
        q = dict(codes=rng.integers(-32, 32, (dout, din)).astype(np.int8))
    else:
        q = dict(codes=rng.standard_normal((dout, din)).astype(np.float16))
    g = din // fmt.group
    for k, dt in dtypes.items():
        cols = g // fmt.ratio if k in ("scale", "min") else g
        a = rng.uniform(0.5, 1.5, (dout, cols)) / 64 if k in ("scale", "min") else \
            rng.integers(1, 32, (dout, cols))
        q[k] = a.astype(dt)
    return {k: jnp.asarray(v) for k, v in q.items()}


def _time(f, x, q, *, reps: int, samples: int) -> float:
    """Median seconds per call of f(x, q), over `samples` blocked runs of a jitted loop of `reps`
    calls (x depends on the previous result, so nothing is hoisted and launches queue back to
    back: device time, not Python dispatch)."""
    import statistics
    import time

    @jax.jit
    def run(x, q):
        def body(_, c):
            return (f(x + c, q)[0, 0] * 1e-30).astype(x.dtype)
        return lax.fori_loop(0, reps, body, jnp.zeros((), x.dtype))

    for _ in range(3):  # compile and warm up
        run(x, q).block_until_ready()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        run(x, q).block_until_ready()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def _bench(argv=None) -> int:
    """Time qmatmul vs jax.jit(x @ dequantize(fmt, q).T) and print GB/s of codes + scales read."""
    import argparse
    import sys

    import numpy as np

    from hyprjax.qformat import nbytes

    ap = argparse.ArgumentParser(prog="python -m hyprjax.kernels.qmatmul", description=_bench.__doc__)
    ap.add_argument("--bench", action="store_true", required=True)
    ap.add_argument("--formats", default=",".join(_BENCH_FORMATS))
    ap.add_argument("--shapes", default="1024x3072,3072x1024", help="din x dout, comma-separated")
    ap.add_argument("--m", default="1,16", help="rows of x, comma-separated")
    ap.add_argument("--x-dtype", default="bfloat16")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--reps", type=int, default=50, help="calls per timed sample")
    ap.add_argument("--sweep", action="store_true",
                    help="GPU: also try block_n x block_k x splits and print the fastest")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    interpret = dev.platform == "cpu"
    print(f"# qmatmul bench on {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
          f"x {args.x_dtype}, median of {args.samples} x {args.reps} calls"
          + ("  [CPU: interpret mode, timings meaningless]" if interpret else ""))
    head = (f"{'format':7} {'M':>3} {'din':>5} {'dout':>5} {'MB':>6} {'kernel us':>10} "
            f"{'GB/s':>7} {'ref us':>9} {'GB/s':>7} {'speedup':>7} {'rel err':>8}")
    print(head)
    failed = 0
    rng = np.random.default_rng(0)
    for name in args.formats.split(","):
        build, dtypes = _BENCH_FORMATS[name]
        for shape in args.shapes.split(","):
            din, dout = map(int, shape.split("x"))
            fmt = build(din)
            q = _random_q(rng, fmt, dtypes, dout, din)
            mb = nbytes(q) / 1e6
            for m in map(int, args.m.split(",")):
                x = jnp.asarray(rng.standard_normal((m, din)), args.x_dtype)
                row = f"{name:7} {m:3d} {din:5d} {dout:5d} {mb:6.2f}"
                try:
                    kern = functools.partial(qmatmul, fmt=fmt, interpret=interpret)
                    ref = lambda x, q: x @ dequantize(fmt, q).T  # noqa: E731
                    want = ref(x, q)
                    err = float(jnp.max(jnp.abs(kern(x, q=q) - want)) / jnp.max(jnp.abs(want)))
                    tk = _time(lambda x, q: kern(x, q=q), x, q, reps=args.reps,
                               samples=args.samples)
                    tr = _time(ref, x, q, reps=args.reps, samples=args.samples)
                    print(f"{row} {tk * 1e6:10.1f} {mb * 1e-3 / tk:7.0f} {tr * 1e6:9.1f} "
                          f"{mb * 1e-3 / tr:7.0f} {tr / tk:7.2f} {err:8.1e}", flush=True)
                    if args.sweep and not interpret:
                        _sweep(fmt, x, q, mb, args)
                except Exception as e:  # a bench row, not a serving path: report and go on
                    failed += 1
                    print(f"{row} ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                          flush=True)
    if failed:
        print(f"# {failed} rows failed", file=sys.stderr)
    return 1 if failed else 0


def _sweep(fmt, x, q, mb, args):
    best = []
    for bn in (16, 32, 64, 128):
        for bk in (64, 128, 256):
            for splits in (None, 1):
                try:
                    f = functools.partial(qmatmul, fmt=fmt, block_n=bn, block_k=bk, splits=splits)
                    t = _time(lambda x, q: f(x, q=q), x, q, reps=args.reps, samples=5)
                    best.append((t, bn, bk, splits))
                except Exception as e:  # noqa: BLE001  (a tile that does not fit this format)
                    print(f"#   bn={bn} bk={bk} splits={splits}: {type(e).__name__}")
    for t, bn, bk, splits in sorted(best)[:3]:
        print(f"#   block_n={bn} block_k={bk} splits={splits}: {t * 1e6:.1f} us, "
              f"{mb * 1e-3 / t:.0f} GB/s")


if __name__ == "__main__":
    raise SystemExit(_bench())
