"""`hyprjax adapters`: extract an adapter from a fine-tune, convert between formats, describe one.

    hyprjax adapters extract --base BASE --tuned TUNED --rank R --density D [--block B] [--quantize int8] --out DST
    hyprjax adapters convert SRC DST --model MODEL [--half] [--quantize int8|int4]
    hyprjax adapters info PATH --model MODEL [--json]

The output format follows DST: `*.vdb` an OpenVDB adapter (every kind; --half, --quantize),
`*.gguf` a llama.cpp LoRA (low-rank only; --half writes F16, --quantize int8 writes Q8_0), and
anything else a PEFT directory (LoRA, or SHiRA for element-sparse adapters holding r * (in +
out) entries per module; float32). A kind a format cannot hold is refused before any work is
done, with the format that can hold it named. MODEL gives the architecture only (its config is
read, its weights are not).

`add_adapters_parser(subparsers)` adds the command to hyprjax/cli.py's parser and
`run_adapters(args)` runs it; `main(argv)` runs it alone (`python -m hyprjax.adapters.adapters_cli`).
Errors are HyprjaxError subclasses, printed as one line by the caller.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..errors import HyprjaxError
from .lora import MODULES, AdapterError, LoraAdapter

QUANTIZE = ("int8", "int4")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 1:
        raise argparse.ArgumentTypeError(f"{text} is not above 1 (10 = a tenth of the weights)")
    return value


def add_adapters_parser(subparsers) -> argparse.ArgumentParser:
    """Add `adapters {extract,convert,info}` to a parser's subparsers; returns the `adapters` parser."""
    top = subparsers.add_parser("adapters", help="extract adapters from fine-tunes, convert formats, describe one",
                                description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    p = sub.add_parser("extract", help="a fully fine-tuned checkpoint -> a low-rank + sparse adapter",
                       description="Split tuned - base per linear module into a truncated SVD (--rank) and the "
                                   "largest entries of what is left (--density, or blocks with --block).")
    p.add_argument("--base", required=True, help="the base model (HF directory, .gguf or a known name)")
    p.add_argument("--tuned", required=True, help="the fully fine-tuned model, same architecture")
    p.add_argument("--rank", type=_count, default=0, help="rank of the low-rank part (0: none)")
    p.add_argument("--density", type=_fraction, default=0.0,
                   help="sparse part: fraction of each module's weights kept (0: none)")
    p.add_argument("--size-ratio", type=_ratio, default=None, metavar="X",
                   help="instead of --density: keep 1/X of the weights' values in all (low-rank factors "
                        "plus sparse values)")
    p.add_argument("--block", type=int, default=None, metavar="B",
                   help="block-sparse: keep whole B x B blocks (16, 32, ...) of largest norm")
    p.add_argument("--refine", type=_count, default=2,
                   help="alternating low-rank / sparse refinement rounds (default 2)")
    p.add_argument("--out", required=True, help="DST: .vdb, .gguf or a PEFT directory")
    p.add_argument("--name", default=None, help="the adapter's name (default: DST's stem)")
    _add_write_args(p)

    p = sub.add_parser("convert", help="convert an adapter between PEFT, llama.cpp GGUF and .vdb")
    p.add_argument("src", help="a PEFT directory (LoRA or SHiRA), a llama.cpp LoRA .gguf or a .vdb adapter")
    p.add_argument("dst", help="DST: .vdb, .gguf or a PEFT directory")
    p.add_argument("--model", "-m", required=True, help="the base model (only its config is read)")
    p.add_argument("--name", default=None, help="the adapter's name (default: DST's stem)")
    _add_write_args(p)

    p = sub.add_parser("info", help="kind, modules, density, bytes and dtype of an adapter")
    p.add_argument("path", help="a PEFT directory, a llama.cpp LoRA .gguf or a .vdb adapter")
    p.add_argument("--model", "-m", required=True, help="the base model (only its config is read)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return top


def _add_write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--half", action="store_true", help="store values as float16 (.vdb; F16 in a .gguf)")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="store integer codes with per-run scales (.vdb: int8 or int4; .gguf: int8 as Q8_0)")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run_adapters(args) -> int:
    """Run the parsed `adapters` command; HyprjaxError on bad input."""
    return {"extract": _extract, "convert": _convert, "info": _info}[args.adapters_command](args)


# ---------------------------------------------------------------- formats

def output_format(dst: str | os.PathLike) -> str:
    """"vdb", "gguf" or "peft", from DST's suffix."""
    suffix = Path(dst).suffix.lower()
    return "vdb" if suffix == ".vdb" else "gguf" if suffix == ".gguf" else "peft"


def check_writable(kind: str, fmt: str, *, half: bool, quantize: str | None, dst) -> None:
    """AdapterError if an adapter of `kind` (or these options) cannot be written as `fmt`."""
    if fmt == "gguf":
        if kind != "lora":
            raise AdapterError(f"{dst}: a llama.cpp LoRA GGUF holds low-rank modules only; this adapter is {kind} "
                               f"(write a .vdb instead)")
        if quantize == "int4":
            raise AdapterError(f"{dst}: llama.cpp LoRA GGUFs are F32, F16, BF16 or Q8_0: --quantize int4 is for "
                               f".vdb (int8 writes Q8_0)")
        if half and quantize:
            raise AdapterError(f"{dst}: give --half (F16) or --quantize int8 (Q8_0), not both")
    elif fmt == "peft":
        if kind not in ("lora", "shira"):
            raise AdapterError(f"{dst}: PEFT has no format for a {kind} adapter (LoRA and SHiRA only); write a "
                               f".vdb instead")
        if half or quantize:
            raise AdapterError(f"{dst}: a PEFT directory is written in float32; --half and --quantize apply to "
                               f".vdb (and .gguf)")
    elif quantize and half:
        pass  # quantized .vdb files store their codes as half anyway


def save_adapter(adapter: LoraAdapter, cfg, dst, *, half: bool = False, quantize: str | None = None) -> str:
    """Write `adapter` to `dst` in the format its suffix names; returns that format."""
    fmt = output_format(dst)
    check_writable(adapter.kind, fmt, half=half, quantize=quantize, dst=dst)
    if fmt == "vdb":
        from .vdb_adapter import write_adapter_vdb

        write_adapter_vdb(dst, adapter, cfg, half=half, quantize=quantize)
    elif fmt == "gguf":
        from .gguf_lora import write_gguf_lora

        alphas = [m.scale * m.rank for m in adapter.modules.values()]
        # One alpha for the file: when modules need different ones (an extraction capped at a
        # module's smaller dimension, PEFT's rank_pattern), alpha 0 (scale 1) with each module's
        # scale folded into its lora_b: the same deltas, as llama.cpp applies them.
        alpha = None if all(math.isclose(a, alphas[0], rel_tol=1e-6) for a in alphas) else 0.0
        write_gguf_lora(dst, adapter, cfg, alpha=alpha, dtype="Q8_0" if quantize else "F16" if half else "F32")
    else:
        from .peft import shira_rank, write_peft

        if adapter.kind == "shira" and shira_rank(adapter) is None:
            raise AdapterError(f"{dst}: PEFT's SHiRA format needs r * (in + out) entries in every module for one "
                               f"integer r, and this adapter's modules differ; write a .vdb instead")
        write_peft(dst, adapter, cfg)
    return fmt


def _model_config(model: str):
    from ..formats.load import read_config
    from ..formats.resolve import resolve_model

    cfg, _ = read_config(resolve_model(model))
    return cfg


def _check_dst(dst: str, force: bool) -> None:
    p = Path(dst)
    if p.exists() and not force:
        raise AdapterError(f"{dst} exists; pass --force to overwrite it")
    if not p.parent.exists():
        raise AdapterError(f"{dst}: the directory {p.parent} does not exist")


def _read(path: str, cfg, name: str) -> LoraAdapter:
    from .load import read_adapter

    return read_adapter(path, name, cfg)


# ---------------------------------------------------------------- commands

def _extract(args) -> int:
    from .extract import extract_from_paths

    if args.size_ratio is not None and args.density:
        raise AdapterError("give --density or --size-ratio, not both")
    if args.rank == 0 and args.density == 0 and args.size_ratio is None:
        raise AdapterError("nothing to extract: give --rank R, --density D (or --size-ratio X), or both")
    if args.block is not None and (args.block < 16 or args.block % 16):
        raise AdapterError(f"--block {args.block}: expected a multiple of 16 (16, 32, ...)")
    _check_dst(args.out, args.force)
    fmt = output_format(args.out)
    sparse = args.density > 0 or args.size_ratio is not None
    kind = ("lora+sparse" if args.rank else "block-sparse" if args.block else "shira") if sparse else "lora"
    check_writable(kind, fmt, half=args.half, quantize=args.quantize, dst=args.out)  # before the slow part
    if fmt == "peft" and kind == "shira":
        raise AdapterError(f"{args.out}: PEFT's SHiRA format needs r * (in + out) entries per module for one r; "
                           f"an extracted sparse part keeps a fraction of each module's weights: write a .vdb")
    name = args.name or Path(args.out).stem
    adapter, cfg = extract_from_paths(args.base, args.tuned, rank=args.rank, density=args.density,
                                      block=args.block, name=name, size_ratio=args.size_ratio, refine=args.refine)
    save_adapter(adapter, cfg, args.out, half=args.half, quantize=args.quantize)
    print(_summary(adapter, cfg, args.out))
    return 0


def _convert(args) -> int:
    _check_dst(args.dst, args.force)
    cfg = _model_config(args.model)
    if Path(args.src).resolve() == Path(args.dst).resolve():
        raise AdapterError(f"{args.dst}: the same path as the source")
    adapter = _read(args.src, cfg, args.name or Path(args.dst).stem)
    save_adapter(adapter, cfg, args.dst, half=args.half, quantize=args.quantize)
    print(_summary(adapter, cfg, args.dst))
    return 0


def _info(args) -> int:
    cfg = _model_config(args.model)
    info = adapter_info(args.path, cfg)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>16}: {value}")
    return 0


def _summary(adapter: LoraAdapter, cfg, dst) -> str:
    size = path_bytes(dst)
    dense = _dense_bytes(adapter, cfg)
    return (f"wrote {dst}: {adapter.kind}, {len({*adapter.modules, *adapter.sparse})} modules, density "
            f"{adapter.density(cfg):.4f}, {size:,} bytes ({dense / max(size, 1):.1f}x smaller than the dense f32 "
            f"delta)")


def _dense_bytes(adapter: LoraAdapter, cfg) -> int:
    from .lora import module_shapes

    shapes = module_shapes(cfg)
    return 4 * sum(shapes[m][0] * shapes[m][1] for _, m in {*adapter.modules, *adapter.sparse})


def path_bytes(path) -> int:
    """A file's size, or the total size of the files in a directory."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def adapter_info(path: str, cfg) -> dict:
    """What `hyprjax adapters info` prints: kind, modules, rank, density, bytes, dtype."""
    adapter = _read(path, cfg, Path(path).stem)
    modules = {}
    for _, m in sorted({*adapter.modules, *adapter.sparse}):
        modules[m] = modules.get(m, 0) + 1
    layers = sorted({layer for layer, _ in (*adapter.modules, *adapter.sparse)})
    info = {"path": str(path), "format": _input_format(path), "kind": adapter.kind,
            "modules": ", ".join(f"{m} x{modules[m]}" for m in sorted(modules, key=MODULES.index)),
            "layers": f"{layers[0]}..{layers[-1]} ({len(layers)})"}
    if adapter.modules:
        info["rank"] = adapter.rank
    info["params"] = adapter.params
    info["density"] = round(adapter.density(cfg), 6)
    if adapter.sparse:
        info["sparse density"] = round(LoraAdapter("", "", sparse=adapter.sparse).density(cfg), 6)
    info["file bytes"] = path_bytes(path)
    info["memory bytes"] = adapter.nbytes
    info["dense f32 bytes"] = _dense_bytes(adapter, cfg)
    info["dtype"] = file_dtype(path)
    return info


def _input_format(path) -> str:
    p = Path(path)
    if p.is_dir():
        return "peft"
    with open(p, "rb") as f:
        return "gguf" if f.read(4) == b"GGUF" else "vdb"


def file_dtype(path) -> str:
    """How the file stores its values: e.g. "F32", "float16", "int8 codes (float16) + float16 scales"."""
    fmt = _input_format(path)
    if fmt == "peft":
        from safetensors import safe_open

        with safe_open(str(Path(path) / "adapter_model.safetensors"), "np") as f:
            kinds = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("indices")}
        return ", ".join(sorted(kinds)) or "none"
    if fmt == "gguf":
        from ..formats.gguf_read import GGUFFile

        gf = GGUFFile(path)
        return ", ".join(sorted({gf.type_name(n) for n in gf.names()}))
    from .vdb import read_vdb

    grids, meta = read_vdb(path)
    stored = sorted({str(g.metadata.get("dtype", "float32")) for g in grids if "quant_of" not in g.metadata})
    if meta.get("quantization"):
        return f"{meta['quantization']} codes (stored as {', '.join(stored)}) + float16 scales"
    return ", ".join(stored)


def main(argv: list[str] | None = None) -> int:
    """`hyprjax adapters ...` on its own, with the CLI's one-line errors."""
    parser = argparse.ArgumentParser(prog="hyprjax")
    add_adapters_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return run_adapters(args)
    except KeyboardInterrupt:
        return 130
    except (HyprjaxError, OSError) as e:
        if args.debug:
            raise
        print(f"hyprjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
