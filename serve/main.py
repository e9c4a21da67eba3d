"""Command-line flags of `hyprjax serve` and running the app under uvicorn.

`hyprjax/cli.py` adds these flags to its `serve` sub-command, builds the engine from them and
calls `run_server(create_app(engine, ...), args.host, args.port)`.
"""

from __future__ import annotations

import argparse
import functools
import re

from hyprjax.adapters.quantized import LORA_QUANTIZATIONS
from hyprjax.engine.config import ADAPTER_DTYPES
from hyprjax.engine.memory import (ACCELERATOR_DEFAULT_FRACTION, CPU_DEFAULT_BYTES, page_bytes, parse_kv_memory,
                                   parse_size)

GRACEFUL_SHUTDOWN_S = 10  # after Ctrl-C / SIGTERM, streams still open this long are cancelled (and aborted)


def parse_bytes(text: str) -> int:
    """argparse type: '2GiB', '512MiB', '1.5GB', '1000000' -> bytes (GiB/MiB binary, GB/MB decimal, bare G/M binary)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def kv_memory(text: str) -> int | float:
    """argparse type: bytes ('512MiB', '2G', '1073741824') or a fraction of free memory ('0.25')."""
    try:
        return parse_kv_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def lora_spec(text: str) -> tuple[str, str]:
    """argparse type: NAME=PATH, or a bare PATH named after its file or directory."""
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = re.sub(r"\.gguf$", "", path.rstrip("/").split("/")[-1])
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=PATH (a PEFT directory or a LoRA .gguf)")
    return name, path


DEFAULT_PAGE_SIZE = 16


@functools.cache
def default_kv_help(page_size: int = DEFAULT_PAGE_SIZE) -> str:
    """The default KV budget, and what it holds in tokens of the default model when that model's
    file is on disk (read from its GGUF header, ~0.1 s; nothing is assembled or hashed)."""
    cpu = f"{CPU_DEFAULT_BYTES // 2**20} MiB on CPU"
    try:
        from hyprjax.default_model import DEFAULT, cached_path
        from hyprjax.formats.load import read_config

        path = cached_path(DEFAULT)
        cfg, _ = read_config(path) if path is not None else (None, None)
    except Exception:  # help text must never fail: a missing or broken default model just drops the count
        cfg = None
    if cfg is not None:
        # bfloat16: the KV dtype --kv-cache-dtype auto picks for the default model's quantized weights
        tokens = CPU_DEFAULT_BYTES // page_bytes(cfg, page_size, 2) * page_size
        cpu += f" = {tokens:,} tokens of the default model ({path.stem}, bfloat16 KV cache)"
    return f"{cpu}; {ACCELERATOR_DEFAULT_FRACTION:g} of free memory on GPU/TPU"


class _LazyHelpStore(argparse.Action):
    """A store action whose help text is built only when help or usage is shown."""

    def __init__(self, *args, help_fn, **kwargs):
        self._help_fn = help_fn
        super().__init__(*args, **kwargs)

    @property
    def help(self):
        return self._help_fn()

    @help.setter
    def help(self, value):  # argparse.Action.__init__ assigns one; the property ignores it
        pass

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the HTTP server and serving-engine flags of `hyprjax serve` to `parser`."""
    http = parser.add_argument_group("HTTP server")
    http.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 = every interface)")
    http.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    http.add_argument("--api-key", default=None, metavar="KEY",
                      help="require 'Authorization: Bearer KEY' on /v1 routes and /metrics (/health and the "
                           "chat page's static files stay open)")
    http.add_argument("--public-metrics", action="store_true",
                      help="serve /metrics without the API key (default: with --api-key, /metrics needs it too)")
    http.add_argument("--max-request-bytes", type=parse_bytes, default=16 << 20, metavar="SIZE",
                      help="largest request body accepted; larger ones get 413 (default 16MiB)")
    http.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                      help="the name clients pass as 'model' (repeatable; the first is reported in answers); "
                           "default: the model's own name")

    eng = parser.add_argument_group("serving engine")
    if "--max-model-len" not in parser._option_string_actions:  # the CLI's shared model flags may have it
        eng.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                         help="context length in tokens (prompt + output) per request; default: the model's own")
    if "--tensor-parallel" not in parser._option_string_actions:  # the CLI's shared model flags may have it
        eng.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                         help="split the model over N devices (tensor parallelism; default 1: one device)")
    eng.add_argument("--data-parallel", type=positive_int, default=1, metavar="N",
                     help="serve from N engine replicas, each with its own copy of the weights on its own "
                          "devices (--tensor-parallel of them each), behind one router that sends each request "
                          "to the replica with the fewest in flight (default 1)")
    eng.add_argument("--max-num-seqs", type=positive_int, default=32, metavar="N",
                     help="most requests decoded together in one batch (default 32)")
    eng.add_argument("--max-num-batched-tokens", type=positive_int, default=None, metavar="N",
                     help="most tokens (prefill chunks + decodes) in one engine step; longer prompts are "
                          "prefilled in chunks (default: the engine's choice)")
    eng.add_argument("--page-size", type=positive_int, default=DEFAULT_PAGE_SIZE, metavar="TOKENS",
                     help=f"tokens per KV cache page (default {DEFAULT_PAGE_SIZE})")
    kv = eng.add_mutually_exclusive_group()
    kv.add_argument("--num-pages", type=positive_int, default=None, metavar="N",
                    help="KV cache pages to allocate (capacity = N x page size tokens over all requests)")
    kv.add_argument("--kv-cache-memory", type=kv_memory, default=None, metavar="SIZE", action=_LazyHelpStore,
                    help_fn=lambda: ("memory for the KV cache, which sets the number of pages: bytes (512MiB, 2G, "
                                     "1073741824) or a fraction of free memory (0.25) when the engine starts "
                                     f"(default: {default_kv_help()})").replace("%", "%%"))
    eng.add_argument("--attention-backend", choices=["auto", "xla", "pallas"], default="auto",
                     help="paged attention: pallas kernels (GPU/TPU), xla (plain jnp, the CPU path), or auto "
                          "(pallas on GPU/TPU, xla on CPU; resolved once at start-up and logged)")
    eng.add_argument("--max-queue", type=positive_int, default=256, metavar="N",
                     help="requests allowed to wait for a batch slot; beyond this the server answers "
                          "503 with Retry-After (default 256)")

    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="NAME=PATH",
                      help="serve an adapter (a PEFT LoRA or SHiRA directory, a llama.cpp LoRA .gguf, or a .vdb "
                           "of any kind: LoRA, element- or block-sparse, low-rank + sparse) under NAME; "
                           "repeatable. Requests pick it with model=NAME or lora_adapters")
    lora.add_argument("--enable-adapter-admin", action="store_true",
                      help="turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default, "
                           "as in vLLM: they read files on the server; put them behind --api-key)")
    lora.add_argument("--lora-dir", default=None, metavar="DIR",
                      help="with --enable-adapter-admin, adapters under DIR may be loaded at run time; "
                           "without it only the --lora paths may be")
    lora.add_argument("--max-loras", type=int, default=None, metavar="N",
                      help="adapters (or merged mixes) on the device at once, each in its own slot; more are "
                           "kept on the host and swapped in least-recently-used first (default 8 when "
                           "--lora or --lora-dir is given, else 0: no adapters, nothing compiled for them)")
    lora.add_argument("--max-lora-rank", type=positive_int, default=None, metavar="R",
                      help="rank of every slot; adapters of higher rank are refused (default: 16, or the "
                           "highest rank among the --lora adapters)")
    lora.add_argument("--max-sparse-rank", type=int, default=None, metavar="R",
                      help="slot capacity for element-sparse (SHiRA) adapters: R * (in + out) values per module, "
                           "the parameter count of a rank-R LoRA (PEFT ShiraConfig's r). Default: what the "
                           "--lora adapters need, else 0 (no table: such adapters are refused)")
    lora.add_argument("--max-block-rank", type=int, default=None, metavar="R",
                      help="slot capacity for block-sparse adapters, as --max-sparse-rank counts it "
                           "(default: what the --lora adapters need, else 0)")
    lora.add_argument("--merge-lora", default=None, metavar="NAME",
                      help="merged mode: add the --lora adapter NAME into the base weights at start-up, so "
                           "requests for it run at the base model's speed; every other request (the base "
                           "model's too) takes it back out per token")
    lora.add_argument("--lora-quantization", choices=list(LORA_QUANTIZATIONS), default="none",
                      help="keep loaded adapters on the host as int8 (a scale per rank vector, 1/4 of float32) "
                           "or int4 (a scale per 128 weights, ~1/8), dequantized into their slot when used; "
                           "none (default): floats")
    lora.add_argument("--adapter-dtype", choices=list(ADAPTER_DTYPES), default="auto",
                      help="the device slot tables' dtype: auto (default; the model's compute dtype, float32 "
                           "on CPU), float32 or bfloat16 (half the bytes each adapter costs a decode step)")

    learn = parser.add_argument_group("learning from traffic")
    learn.add_argument("--learn", action="append", default=[], metavar="NAME",
                       help="learn adapter NAME from its traffic (repeatable): its interactions are recorded, "
                            "POST /v1/feedback labels or corrects them, and background rounds train versions "
                            "NAME@v1, NAME@v2, ... promoted behind the alias NAME when they beat the live one on "
                            "held-out feedback. Starts from --lora NAME=PATH if given, else from a fresh LoRA "
                            "that answers as the base model does")
    learn.add_argument("--learn-db", default=None, metavar="PATH",
                       help="the SQLite database of interactions, feedback and versions; versions are written "
                            "beside it under adapters/ (default: $HYPRJAX_DATA_DIR/learn/learn.db, else "
                            "~/.local/share/hyprjax/learn/learn.db)")
    learn.add_argument("--learn-every", type=positive_int, default=16, metavar="N",
                       help="start a round after N new trainable feedback items (corrections, positive labels); "
                            "POST /v1/adapters/NAME/train starts one at once (default 16)")
    learn.add_argument("--learn-lr", type=float, default=None, metavar="LR",
                       help="learning rate of the rounds (default: hyprjax.learn.rounds.LearnOptions)")
    learn.add_argument("--learn-steps", type=positive_int, default=None, metavar="N",
                       help="optimizer steps per round (default: a number of passes over the round's data, "
                            "between LearnOptions' min_steps and max_steps)")


def run_server(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve `app` until Ctrl-C / SIGTERM; open streams get GRACEFUL_SHUTDOWN_S seconds to finish."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run()
