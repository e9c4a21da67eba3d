"""The `hyprjax` command: info, generate, chat, serve, train, models, pull.

Bad input (files, configs, flags, prompts) ends with one line on stderr and exit code 2, never
a traceback; `--debug` shows the traceback for bug reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .compile_cache import ENV_VAR
from .engine.config import KV_CACHE_DTYPES
from .errors import HyprjaxError
from .quant import MODES
from .serve.main import positive_int

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a HF model directory, a .gguf file, a model known by name "
                   "(hyprjax models), or a hub id (org/name or org/name:file.gguf; needs a network); "
                   "default: smollm2-135m-instruct")
    p.add_argument("--model", "-m", dest="model_flag", metavar="MODEL", help="same as the positional MODEL")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="parameter dtype; auto = float32 on CPU (fastest there), bfloat16 on GPU/TPU")
    p.add_argument("--quantization", "-q", default="auto", choices=list(MODES),
                   help="weights on the device: none (floats as loaded); int8 (one scale per output "
                        "channel, 4x less than float32); int4 (an f16 scale and minimum per 32 weights, ~6x less); keep "
                        "(a GGUF's own blocks, Q8_0/Q4_K/Q6_K/..., packed and exact); keep8 (keep with "
                        "4-bit codes widened to int8); auto: int8 on CPU (fastest there) / keep on GPU "
                        "for a quantized GGUF, else none")
    p.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                   help="context length in tokens (prompt + output); default: the model's own")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="the KV cache's dtype: float32, bfloat16 (half the memory per token; on CPU a faster "
                        "decode at long contexts), or auto (default): bfloat16 when the weights are quantized or "
                        "computed in bfloat16, float32 for a float32 model")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                   help="split the model over N devices (tensor parallelism; default 1: one device)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", default=None, metavar="DIR",
                       help="keep compiled steps in DIR so the next start loads them instead of compiling "
                            f"(default: ${ENV_VAR}, else ~/.cache/hyprjax/jax)")
    cache.add_argument("--no-compile-cache", dest="compile_cache", action="store_false", default=None,
                       help="compile everything at start-up; read and write no compile cache")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", type=speculative_method, default=None, metavar="ngram|draft:PATH",
                   help="ngram: propose each sequence's next tokens from n-grams of its own prompt and output "
                        "(prompt lookup), which pays off on input-grounded text (rewrites, summaries, code "
                        "edits); draft:PATH: a smaller model sharing the target's tokenizer (a .gguf file or a "
                        "HF directory) proposes them. The target verifies them in one step, exactly: greedy "
                        "and seeded requests give the tokens they give without speculation")
    g.add_argument("--num-speculative-tokens", type=positive_int, default=7, metavar="K",
                   help="drafts per sequence and step (default 7)")
    g.add_argument("--ngram-min", type=positive_int, default=2, metavar="N",
                   help="shortest n-gram to match (default 2)")
    g.add_argument("--ngram-max", type=positive_int, default=4, metavar="M",
                   help="longest n-gram to match (default 4)")


def speculative_method(text: str) -> str:
    from .engine.config import draft_source

    if text == "ngram" or draft_source(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected ngram or draft:PATH (a draft model's .gguf file or "
                                     "HF directory)")


def spec_options(args) -> dict:
    """EngineConfig fields of the --speculative flags."""
    return dict(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                ngram_min=args.ngram_min, ngram_max=args.ngram_max)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", "-t", type=float, default=0.7, help="0 = greedy; higher = more random")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p(best) (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide logits of tokens already in prompt or output (1 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty, -2..2")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty, -2..2")
    g.add_argument("--seed", type=int, default=None, help="random seed; the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable; not included in the output)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyprjax", description="A pure-JAX LLM runtime for Qwen-family models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="show a model's config, tensors and tokenizer without loading weights")
    p.add_argument("model", nargs="?", help="a HF model directory or a .gguf file")
    p.add_argument("--model", "-m", dest="model_flag", metavar="MODEL", help="same as the positional MODEL")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--memory", action="store_true",
                   help="also print the parameter bytes on the device per weight mode (float32, bfloat16, int8) "
                        "and what --quantization auto picks here")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    p = sub.add_parser("generate", help="complete a prompt and print the text")
    _add_model_args(p)
    p.add_argument("--prompt", "-p", action="append", required=True,
                   help="the prompt (repeat for a batch of prompts, generated together)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--no-think", action="store_true", help="with --chat: Qwen3 enable_thinking=False")
    p.add_argument("--stats", action="store_true", help="print tokens and tokens/s to stderr")
    _add_sampling_args(p, max_tokens=128)
    _add_spec_args(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: continuous batching over a paged KV cache")
    _add_model_args(p)
    from .serve.main import add_serve_arguments

    add_serve_arguments(p)
    _add_spec_args(p)

    _add_train_parser(sub)
    from .adapters.adapters_cli import add_adapters_parser

    add_adapters_parser(sub)

    p = sub.add_parser("models", help="list the models hyprjax knows by name and whether they are on disk")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    p = sub.add_parser("pull", help="fetch a model known by name into the cache (verified by sha256)")
    p.add_argument("name", help="a name from `hyprjax models`")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    p = sub.add_parser("chat", help="interactive chat in the terminal, streamed (/reset, /exit)")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation")
    p.add_argument("--no-think", action="store_true", help="Qwen3 enable_thinking=False")
    _add_sampling_args(p, max_tokens=1024)
    _add_spec_args(p)
    return parser


def _add_train_parser(sub) -> None:
    from .adapters.lora import MODULES

    p = sub.add_parser("train", help="train an adapter (LoRA, SHiRA, block-sparse, LoRA + sparse) on JSONL data "
                       "(the base model stays frozen)",
                       description="Train an adapter over a frozen base model. Writes OUT/adapter.vdb (every kind; "
                       "serve it with --lora NAME=OUT/adapter.vdb), OUT/adapter (PEFT: lora, and shira when PEFT can "
                       "hold it), OUT/adapter.gguf (llama.cpp: lora), OUT/metrics.jsonl and orbax checkpoints in "
                       "OUT/checkpoints.")
    p.add_argument("model", nargs="?", help="the base model: a HF directory, a .gguf file or a known name "
                   "(default: the default model)")
    p.add_argument("--model", "-m", dest="model_flag", metavar="MODEL", help="same as the positional MODEL")
    p.add_argument("--data", required=True, metavar="FILE", help='JSONL training data, one object a line: '
                   '{"messages": [...]} (loss on assistant turns), {"prompt", "completion"} (loss on the '
                   'completion) or {"text"}')
    p.add_argument("--eval", default=None, metavar="FILE", help="held-out JSONL data: eval loss in metrics.jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--adapter", default="lora", choices=["lora", "shira", "block-sparse", "lora+sparse"],
                   help="adapter kind: lora, shira (element-sparse), block-sparse, lora+sparse (RoSA)")
    p.add_argument("--rank", type=positive_int, default=16, metavar="R",
                   help="LoRA rank (default 16); for shira without --density, PEFT's r: r x (in + out) entries")
    p.add_argument("--density", type=float, default=None, metavar="D",
                   help="sparse kinds: fraction of each targeted weight trained (default 0.01; shira: the "
                        "PEFT r nearest it)")
    p.add_argument("--block", type=int, default=None, choices=[16, 32], metavar="B",
                   help="b x b blocks: block-sparse (default 16), or lora+sparse's sparse part (default: elements)")
    p.add_argument("--mask", default="fisher", choices=["fisher", "random"],
                   help="sparse kinds: fisher (largest accumulated squared gradients, RoSA) or random "
                        "(PEFT SHiRA's default); default fisher")
    p.add_argument("--mask-warmup", type=positive_int, default=8, metavar="N",
                   help="steps whose squared gradients choose the fisher mask (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank: scale 2)")
    p.add_argument("--target-modules", nargs="+", default=list(MODULES), metavar="MODULE", choices=list(MODULES),
                   help="modules to adapt (default: all seven linear layers)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=positive_int, metavar="N", help="optimizer steps")
    length.add_argument("--epochs", type=float, metavar="E", help="passes over the packed data")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="linear warmup steps, then cosine "
                   "decay to lr/10 (default: 3%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="packed rows per micro-batch (default 4)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per packed row (default 512)")
    p.add_argument("--grad-accum", type=positive_int, default=1, metavar="A",
                   help="micro-batches per optimizer step (default 1)")
    p.add_argument("--remat", default="none", metavar="none|layer|every:N",
                   help="recompute activations in the backward pass: each layer, or each group of N layers "
                        "(less memory, one more forward); default none")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype; the adapter and AdamW state stay float32 (default float32)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order (default 0)")
    p.add_argument("--data-parallel", type=positive_int, default=1, metavar="D",
                   help="split each batch's rows over D devices (default 1)")
    p.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="T",
                   help="split the base weights over T devices (default 1); D x T devices in all")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--save-every", type=positive_int, default=100, metavar="N", help="checkpoint every N steps")
    p.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help="eval loss every N steps (default: at the start and the end)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def cmd_train(args) -> int:
    from .training import train

    result = train(_model_arg(args), args.data, args.out, eval=args.eval, resume=args.resume,
                   save_every=args.save_every, eval_every=args.eval_every, adapter=args.adapter, rank=args.rank,
                   alpha=args.alpha, density=args.density, block=args.block, mask=args.mask,
                   mask_warmup=args.mask_warmup, target_modules=tuple(args.target_modules), steps=args.steps,
                   epochs=args.epochs, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                   clip=args.clip, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
                   remat=args.remat, dtype=args.dtype, seed=args.seed, data_parallel=args.data_parallel,
                   tensor_parallel=args.tensor_parallel)
    evals = "" if result.eval_loss is None else f", eval loss {result.initial_eval_loss:.4f} -> {result.eval_loss:.4f}"
    print(f"trained {result.steps} steps: loss {result.loss:.4f}{evals}, {result.tokens_per_s:.0f} tokens/s, "
          f"peak RSS {result.peak_rss_mib / 1024:.2f} GiB\n"
          f"adapter: {', '.join(map(str, result.files))}")
    return 0


def _sampling(args):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def _model_arg(args) -> str:
    if args.model and args.model_flag and args.model != args.model_flag:
        raise HyprjaxError(f"two models given: {args.model!r} and --model {args.model_flag!r}")
    model = args.model or args.model_flag
    if model:
        return model
    from .default_model import default_model_path

    return str(default_model_path())


def served_name(model_arg: str, path) -> str:
    """The model name the server answers to: a catalog name or Ollama's NAME:TAG as given, else
    the file's stem or the directory's name."""
    from .default_model import NAMES, SMOLLM2
    from .formats.ollama import PREFIX, served_name as ollama_name

    if model_arg in NAMES:
        return model_arg
    if str(path) == str(SMOLLM2.cached):  # the default, given by no argument
        return SMOLLM2.name
    if model_arg.startswith(PREFIX):
        return ollama_name(model_arg)
    return path.stem if path.is_file() else path.name


def _load(args):
    from .llm import LLM

    print(f"loading {_model_arg(args)} ...", file=sys.stderr)
    return LLM(_model_arg(args), dtype=args.dtype, max_model_len=args.max_model_len,
               compile_cache=args.compile_cache, tensor_parallel=args.tensor_parallel,
               quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, **spec_options(args))


def cmd_info(args) -> int:
    from .info import model_info

    info = model_info(_model_arg(args), memory=args.memory)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>24}: {value}")
    return 0


def cmd_generate(args) -> int:
    params = _sampling(args)
    llm = _load(args)
    stream = len(args.prompt) == 1
    write = (lambda i, text: (sys.stdout.write(text), sys.stdout.flush())) if stream else None
    start = time.perf_counter()
    if args.chat:
        convs = [[{"role": "user", "content": p}] for p in args.prompt]
        out = llm.chat(convs, params, enable_thinking=False if args.no_think else None, on_text=write)
    else:
        out = llm.generate(args.prompt, params, on_text=write)
    elapsed = time.perf_counter() - start
    if stream:
        sys.stdout.write("\n")
    else:
        for i, c in enumerate(out):
            print(f"--- [{i}] {args.prompt[i]!r} ({c.finish_reason})\n{c.text}")
    if args.stats:
        n = sum(len(c.token_ids) for c in out)
        print(f"{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tok/s, compile included)", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _load(args)
    if not llm.tokenizer.has_chat_template:
        raise HyprjaxError(f"{llm.path}: this model has no chat template; use `hyprjax generate` instead")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = list(system)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = llm.chat(history, params, enable_thinking=False if args.no_think else None,
                             on_text=lambda i, text: (sys.stdout.write(text), sys.stdout.flush()))
        except HyprjaxError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
            history.pop()
            print(f"\nhyprjax: {e}", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": reply.text})


def cmd_serve(args) -> int:
    import logging
    import threading

    from .engine.async_engine import AsyncEngine
    from .engine.config import EngineConfig
    from .engine.llm_engine import LLMEngine
    from .engine.memory import limit_malloc_arenas, release_free_memory
    from .adapters.load import read_adapter
    from .adapters.registry import sparse_capacity
    from .compile_cache import cache_stats, enable_compile_cache
    from .formats.load import load_model
    from .llm import resolve_dtype
    from .serve.app import create_app
    from .engine.replicas import Replicas, replica_meshes, replica_models
    from .serve.main import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limit_malloc_arenas()  # before the engine, XLA and HTTP threads allocate
    enable_compile_cache(args.compile_cache)
    source = _model_arg(args)
    if len({n for n, _ in args.lora}) != len(args.lora):
        raise HyprjaxError(f"--lora names an adapter twice: {[n for n, _ in args.lora]}")
    if args.lora_dir is not None and not os.path.isdir(args.lora_dir):
        raise HyprjaxError(f"--lora-dir {args.lora_dir}: no such directory")
    max_loras = args.max_loras if args.max_loras is not None else (8 if args.lora or args.lora_dir or args.learn else 0)
    if max_loras < 0 or (max_loras == 0 and (args.lora or args.lora_dir or args.learn)):
        raise HyprjaxError(f"--max-loras {max_loras}: serving adapters needs at least one slot")
    meshes = replica_meshes(args.data_parallel, args.tensor_parallel)
    print(f"loading {source} ...", file=sys.stderr)
    loaded = load_model(source, dtype=resolve_dtype(args.dtype), quantization=args.quantization)  # bad files fail here, before serving
    release_free_memory()
    adapters = [read_adapter(path, name, loaded.cfg, args.max_lora_rank) for name, path in args.lora]
    max_rank = args.max_lora_rank or max([16] + [a.rank for a in adapters])
    sparse_rank, block_rank = sparse_capacity(adapters, loaded.cfg)
    learner = _learner(args, loaded, adapters)
    adapters = [a for a in adapters if a.name not in args.learn]  # served as versions behind an alias
    sparse_rank = sparse_rank if args.max_sparse_rank is None else args.max_sparse_rank
    block_rank = block_rank if args.max_block_rank is None else args.max_block_rank
    ecfg = EngineConfig(max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens or max(256, args.max_num_seqs),
                        page_size=args.page_size, num_pages=args.num_pages,
                        kv_cache_memory=args.kv_cache_memory,
                        max_model_len=args.max_model_len, attention_backend=args.attention_backend,
                        max_queue=args.max_queue, max_loras=max_loras, max_lora_rank=max_rank,
                        lora_quantization=args.lora_quantization, adapter_dtype=args.adapter_dtype,
                        kv_cache_dtype=args.kv_cache_dtype,
                        max_sparse_rank=sparse_rank, max_block_rank=block_rank, **spec_options(args))
    names = args.served_model_name or [served_name(_model_arg(args), loaded.path)]
    if args.merge_lora and args.merge_lora not in {n for n, _ in args.lora}:
        raise HyprjaxError(f"--merge-lora {args.merge_lora!r} is not one of the --lora adapters")
    if args.merge_lora and len(meshes) * (args.tensor_parallel or 1) > 1:
        raise HyprjaxError("--merge-lora needs the weights on one device (no --data-parallel or --tensor-parallel)")
    if args.merge_lora and args.merge_lora in args.learn:
        raise HyprjaxError(f"--merge-lora {args.merge_lora!r}: a learned adapter changes version; it cannot be merged")
    clash = [n for n, _ in args.lora if n in names] + [n for n in args.learn if n in names]
    if clash:
        raise HyprjaxError(f"--lora name {clash[0]!r} is the base model's served name; pick another")
    fronts = [AsyncEngine(None, names[0], tokenizer=loaded.tokenizer) for _ in meshes]
    front = fronts[0] if len(fronts) == 1 else Replicas(fronts, names[0])
    app = create_app(front, api_key=args.api_key, served_model_names=names, lora_paths=[p for _, p in args.lora],
                     lora_dir=args.lora_dir, enable_adapter_admin=args.enable_adapter_admin,
                     public_metrics=args.public_metrics, max_request_bytes=args.max_request_bytes, learner=learner)
    versions = [] if learner is None else learner.startup_adapters()

    def build():  # compile the step buckets while /health answers 503
        try:
            for i, (mesh, model) in enumerate(zip(meshes, replica_models(loaded.model, loaded.cfg, meshes))):
                if len(meshes) > 1:
                    print(f"replica {i + 1}/{len(meshes)} on {', '.join(str(d) for d in mesh.devices.flat)}",
                          file=sys.stderr)
                engine = LLMEngine(model, loaded.cfg, loaded.tokenizer, ecfg, mesh=mesh)
                release_free_memory()  # what loading and the warm-up freed, back to the OS
                for adapter in adapters:
                    engine.add_adapter(adapter)
                for name, path in versions:  # every version of a learned adapter is an adapter of its own
                    engine.add_adapter(read_adapter(path, name, loaded.cfg, max_rank))
                if args.merge_lora:
                    engine.merge_adapter(args.merge_lora)
                fronts[i].attach(engine)
            if learner is not None:
                learner.attach(front)
            hits, misses = cache_stats()["hits"], cache_stats()["misses"]
            cached = f"; compile cache: {hits} programs loaded, {misses} compiled" if hits + misses else ""
            print(f"ready: http://{args.host}:{args.port}/v1 (model {names[0]!r}, context "
                  f"{front.max_model_len} tokens{cached})", file=sys.stderr)
        except HyprjaxError as e:  # a setting the engine refuses: one line, then stop the server
            print(f"hyprjax: error: {e}", file=sys.stderr)
            os._exit(EXIT_USAGE)
        except Exception:  # a bug (a kernel that fails to lower, out of memory): the whole traceback
            logging.getLogger("hyprjax").exception("building the engine failed")
            os._exit(1)

    threading.Thread(target=build, name="hyprjax-build", daemon=True).start()
    run_server(app, args.host, args.port)
    front.shutdown()
    if learner is not None:
        learner.shutdown()
    return 0


def _learner(args, loaded, adapters):
    """The Learner for --learn NAME ... (None without), starting from the --lora adapters of those names."""
    if not args.learn:
        return None
    from .learn import default_db
    from .learn.learner import Learner
    from .learn.rounds import LearnOptions

    if len(set(args.learn)) != len(args.learn):
        raise HyprjaxError(f"--learn names an adapter twice: {args.learn}")
    options = {}
    if args.learn_lr is not None:
        if not args.learn_lr > 0:
            raise HyprjaxError(f"--learn-lr {args.learn_lr}: must be positive")
        options["lr"] = args.learn_lr
    if args.learn_steps is not None:
        options.update(min_steps=args.learn_steps, max_steps=args.learn_steps)
    db = args.learn_db or default_db()
    print(f"learning {', '.join(args.learn)}: database {db}", file=sys.stderr)
    return Learner(db, args.learn, str(loaded.path), loaded.cfg, initial={a.name: a for a in adapters},
                   options=LearnOptions(**options), learn_every=args.learn_every)


def cmd_models(args) -> int:
    from .default_model import DEFAULT, list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        mark = " (default)" if r["name"] == DEFAULT else ""
        where = r["path"] or f"not on disk: {r['fetch']}"
        print(f"{r['name']}{mark}\n  {r['about']}\n  {where}")
    return 0


def cmd_pull(args) -> int:
    from .default_model import named_model_path

    print(named_model_path(args.name))
    return 0


def _run_adapters(args) -> int:
    from .adapters.adapters_cli import run_adapters

    return run_adapters(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"info": cmd_info, "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve,
               "models": cmd_models, "pull": cmd_pull,
               "train": cmd_train, "adapters": _run_adapters}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (HyprjaxError, OSError) as e:
        if args.debug:
            raise
        print(f"hyprjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
