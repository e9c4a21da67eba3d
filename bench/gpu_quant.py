"""Decode-step weight bandwidth per weight mode on an accelerator, and whether XLA fuses the dequantize.

    python bench/gpu_quant.py --shape qwen3-0.6b --out bench/results/gpu_quant.json

A random model of the preset shape is built on the device in each mode (none in float32 and
bfloat16, int8, int4, and `keep` with every matrix in Q4_K's layout and the embedding in Q6_K's:
what a Q4_K_M file becomes), and one decode step (batch 1, one token, attention over its own
token: the step's weight reads without KV-cache reads) is timed with both quantized matmul paths
(the Pallas kernel and XLA's fusion of `x @ dequantize(q).T`). Utilisation is parameter bytes
read per step over the step's time, against the card's peak (`--peak-gbs`; H100 SXM: 3350). It
also saves XLA's optimized HLO of one quantized matmul per format and reports whether the convert
of the codes sits in the same fusion as the dot. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hyprjax.config import PRESETS  # noqa: E402
from hyprjax.model import Linear, Model, set_quantized  # noqa: E402
from hyprjax.qformat import QFormat  # noqa: E402
from hyprjax.quant import qdot, quantize_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[gpu_quant] {msg}", file=sys.stderr, flush=True)


Q4_K = QFormat(bits=4, group=32, ratio=8, name="Q4_K")
Q6_K = QFormat(bits=8, group=16, ratio=16, name="Q6_K")


def random_packed(fmt: QFormat, lead: tuple, dout: int, din: int, key) -> dict:
    """Random arrays of a K-quant layout (sane scales; the values do not matter for speed)."""
    k = jax.random.split(key, 5)
    g = din // fmt.group
    if fmt.bits == 4:
        codes = jax.random.randint(k[0], (*lead, dout, din // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    else:
        codes = jax.random.randint(k[0], (*lead, dout, din), -32, 32, jnp.int32).astype(jnp.int8)
    q = dict(codes=codes, scale=jax.random.uniform(k[1], (*lead, dout, g // fmt.ratio), jnp.float16, 1e-3, 1e-2),
             sub=jax.random.randint(k[2], (*lead, dout, g), 0, 64, jnp.int32).astype(jnp.uint8))
    if fmt.bits == 4:
        q["min"] = jax.random.uniform(k[3], (*lead, dout, g // fmt.ratio), jnp.float16, -1e-2, 0)
        q["msub"] = jax.random.randint(k[4], (*lead, dout, g), 0, 64, jnp.int32).astype(jnp.uint8)
    return q


def build(cfg, mode: str):
    dtype = jnp.bfloat16 if mode == "bfloat16" else jnp.float32
    model = Model(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    if mode in ("int8", "int4"):
        quantize_model(model, mode)
    elif mode == "keep":
        key = jax.random.key(1)
        for _, node in nnx.iter_graph(model):
            if isinstance(node, Linear) and node.qfmt is None:
                *lead, din, dout = node.kernel[...].shape
                key, sub = jax.random.split(key)
                set_quantized(node, "kernel", Q4_K, random_packed(Q4_K, tuple(lead), dout, din, sub))
        v, d = model.embed.embedding[...].shape
        set_quantized(model.embed, "embedding", Q6_K, random_packed(Q6_K, (), v, d, key))
    return model


def param_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def time_step(model, repeats: int) -> float:
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token):
        m = nnx.merge(graphdef, state)
        logits, _ = m(token, jnp.zeros((1, 1), jnp.int32))
        return jnp.argmax(logits[0, -1])

    token = jnp.ones((1, 1), jnp.int32)
    step(state, token).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(state, token).block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fusion_check(out_dir: Path) -> dict:
    """XLA's optimized HLO of the engine's quantized matmul on the device (`quant.qdot`, XLA path)
    with bfloat16 x, for int8, Q4_K and Q6_K: is the convert of the codes inside the fusion that
    computes the dot?"""
    res = {}
    os.environ["HYPRJAX_QMATMUL"] = "xla"
    key = jax.random.key(2)
    cases = {"int8": (QFormat(bits=8, group=1024, name="int8"), None), "Q4_K": (Q4_K, None), "Q6_K": (Q6_K, None)}
    for name, (fmt, _) in cases.items():
        if name == "int8":
            q = dict(codes=jax.random.randint(key, (3072, 1024), -127, 128, jnp.int32).astype(jnp.int8),
                     scale=jnp.ones((3072, 1), jnp.float32))
        else:
            q = random_packed(fmt, (), 3072, 1024, key)
        for rows in (1, 16):
            x = jnp.ones((rows, 1024), jnp.bfloat16)
            hlo = jax.jit(lambda x, q, fmt=fmt: qdot(x, fmt, q)).lower(x, q).compile().as_text()
            (out_dir / f"hlo_{name}_rows{rows}.txt").write_text(hlo)
            fused = _convert_fused_with_dot(hlo)
            res[f"{name} rows={rows}"] = fused
            log(f"HLO {name} rows={rows}: convert fused into the dot's fusion: {fused}")
    return res


def _convert_fused_with_dot(hlo: str) -> bool:
    """True when some fused computation holds both a convert of an integer and the dot (a Triton
    GEMM fusion, or a loop fusion around the dot), i.e. the codes are never written out as floats."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and "{" in line and "(" in line:
            cur = line.split(" ")[0].lstrip("%")
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)
    for body in comps.values():
        text = "\n".join(body)
        has_dot = " dot(" in text or "__triton_gemm" in text or "kind=kCustom" in text
        ints = {ln.split("=")[0].strip().lstrip("%") for ln in body if re.search(r"= [su]8\[", ln)}
        converts = [re.search(r"convert\(%?([\w.-]+)\)", ln) for ln in body if "convert(" in ln]
        if has_dot and any(m and m.group(1) in ints for m in converts):
            return True
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--modes", nargs="+", default=["float32", "bfloat16", "int8", "int4", "keep"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--peak-gbs", type=float, default=3350.0, help="the card's HBM bandwidth, GB/s")
    ap.add_argument("--out", default="bench/results/gpu_quant.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = PRESETS[args.shape]
    device = str(jax.devices()[0].device_kind)
    log(f"{device}: {args.shape}")
    rows = []
    for mode in args.modes:
        model = build(cfg, mode)
        nbytes = param_bytes(model)
        paths = ["xla"] if mode in ("float32", "bfloat16") else ["pallas", "xla"]
        for path in paths:
            os.environ["HYPRJAX_QMATMUL"] = path
            try:
                t = time_step(model, args.repeats)
            except Exception as e:  # a path that does not lower here is a finding, not a crash
                log(f"{mode}/{path}: failed: {type(e).__name__}: {str(e)[:300]}")
                rows.append(dict(mode=mode, path=path, error=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            gbs = nbytes / t / 1e9
            rows.append(dict(mode=mode, path=path, param_mib=nbytes / 2**20, step_ms=t * 1e3, weight_gbs=gbs,
                             utilisation=gbs / args.peak_gbs))
            log(f"{mode}/{path}: {nbytes / 2**20:,.0f} MiB, {t * 1e3:.3f} ms/step, {gbs:,.0f} GB/s "
                f"({100 * gbs / args.peak_gbs:.0f}% of {args.peak_gbs:.0f})")
        del model
    fused = fusion_check(out.parent)
    out.write_text(json.dumps(dict(command=" ".join(sys.argv), device=device, shape=args.shape, rows=rows,
                                   hlo_convert_fused=fused), indent=2))
    print("| mode | matmul path | params MiB | step ms | weight GB/s | of peak |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['path']} | - | - | - | {r['error'][:60]} |")
        else:
            print(f"| {r['mode']} | {r['path']} | {r['param_mib']:,.0f} | {r['step_ms']:.3f} | {r['weight_gbs']:,.0f} | "
                  f"{100 * r['utilisation']:.0f}% |")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
