"""Run llama.cpp on a GGUF file in a subprocess: prefill and decode speed, and its greedy tokens.

    python bench/llamacpp.py bench/models/qwen3-0.6b-f16.gguf --threads 2

The engine runs in a child process, so a crash inside llama.cpp (these VMs advertise AMX and then
kill a process with SIGILL on its first AMX instruction) comes back as an error, never kills the
caller. Both engines are fed token ids, not text, so hyprjax and llama.cpp see identical input.
Prefill is one fresh prompt of `n_prompt` tokens (llama-bench's pp512); decode is greedy batch-1
generation right after that prompt, timed over the n_gen-1 single-token steps after the first
token (the first comes from the prefill logits), as llama.cpp's own "eval time" counts it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BACKENDS = ("llama-cpp-python", "xllamacpp")
INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
           '-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON '
           '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF" '
           'pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36  (docs/llamacpp.md: why, and flags)')


class LlamaCppError(RuntimeError):
    """llama.cpp is missing, or its subprocess failed; the message says which and what to do."""


def default_prompt(n_prompt: int, vocab_size: int, seed: int = 0) -> list[int]:
    """The fixed prompt both engines get when none is given: seeded random ids below vocab_size."""
    return np.random.default_rng(seed).integers(0, vocab_size, n_prompt).tolist()


def available_backend(backend: str = "auto") -> str | None:
    """The backend `run_llamacpp` would use, found without importing it (an import may SIGILL)."""
    names = BACKENDS if backend == "auto" else (backend,)
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
        if importlib.util.find_spec(name.replace("-python", "").replace("-", "_")) is not None:
            return name
    return None


def run_llamacpp(gguf_path: str, n_prompt: int = 512, n_gen: int = 128, threads: int = 2, repeats: int = 3, *,
                 prompt_tokens: list[int] | None = None, backend: str = "auto", kv_type: str = "f16",
                 flash_attn: bool = True, timeout: float = 1800.0) -> dict:
    """Benchmark llama.cpp on `gguf_path`; returns dict(prefill_tok_s, decode_tok_s, tokens, backend, version, ...).

    `prompt_tokens` overrides the seeded `default_prompt(n_prompt, vocab)`; `tokens` are the n_gen
    greedy ids of the last repeat (None from xllamacpp when its reply merged partial-UTF-8 tokens).
    Speeds are medians over `repeats` (each run is in `prefill_runs` / `decode_runs`). `kv_type`
    "f32" keeps the KV cache exact (token-equality tests); "f16" is llama.cpp's default. `flash_attn`
    True matches llama.cpp's own default ("auto", which turns it on for the CPU backend).
    Raises LlamaCppError naming the install command if llama.cpp is missing or its process fails.
    """
    if not Path(gguf_path).is_file():
        raise ValueError(f"gguf_path {str(gguf_path)!r} is not a file")
    name = available_backend(backend)
    if name is None:
        raise LlamaCppError(f"llama.cpp ({backend}) is not installed; install it with: {INSTALL}")
    if kv_type not in ("f16", "f32"):
        raise ValueError(f"kv_type {kv_type!r}: choose f16 or f32")
    if n_gen < 2 or (prompt_tokens is None and n_prompt < 1) or repeats < 1:
        raise ValueError(f"need n_gen >= 2, n_prompt >= 1, repeats >= 1 (got {n_gen}, {n_prompt}, {repeats})")
    args = dict(path=str(gguf_path), n_prompt=n_prompt, n_gen=n_gen, threads=threads, repeats=repeats,
                prompt=None if prompt_tokens is None else [int(t) for t in prompt_tokens],
                backend=name, kv_type=kv_type, flash_attn=bool(flash_attn))
    try:
        p = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(args), text=True,
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LlamaCppError(f"llama.cpp ({name}) on {gguf_path} took longer than {timeout:.0f} s") from None
    if p.returncode != 0:
        why = f"exit status {p.returncode}"
        if p.returncode < 0:
            why = f"killed by {signal.Signals(-p.returncode).name}"
            if -p.returncode == signal.SIGILL:
                why += " (an instruction this CPU refuses, e.g. AMX: rebuild with AMX off, docs/llamacpp.md)"
        raise LlamaCppError(f"llama.cpp ({name}) on {gguf_path}: {why}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- child process ---------------------------------------------------------------------------

def _worker(a: dict) -> dict:
    run = _run_llama_cpp_python if a["backend"] == "llama-cpp-python" else _run_xllamacpp
    return run(a)


def _run_llama_cpp_python(a: dict) -> dict:
    import llama_cpp

    n_prompt = len(a["prompt"]) if a["prompt"] else a["n_prompt"]
    kv = llama_cpp.GGML_TYPE_F32 if a["kv_type"] == "f32" else llama_cpp.GGML_TYPE_F16
    llm = llama_cpp.Llama(a["path"], n_ctx=n_prompt + a["n_gen"] + 16, n_batch=max(n_prompt, 1),
                          n_ubatch=min(512, n_prompt), n_threads=a["threads"], n_threads_batch=a["threads"],
                          type_k=kv, type_v=kv, flash_attn=a["flash_attn"], verbose=False)
    n_vocab = llm.n_vocab()
    prompt = a["prompt"] or default_prompt(n_prompt, n_vocab)

    def argmax() -> int:
        # Logits of the last evaluated token, read straight from the context (eval keeps none).
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    llm.eval(prompt[:8])  # warm-up, as llama-bench does: first-call allocations are not speed
    pre, dec = [], []
    for _ in range(a["repeats"]):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = argmax()
        t1 = time.perf_counter()
        tokens = [tok]
        while len(tokens) < a["n_gen"]:
            llm.eval([tok])
            tok = argmax()
            tokens.append(tok)
        t2 = time.perf_counter()
        pre.append(n_prompt / (t1 - t0))
        dec.append((a["n_gen"] - 1) / (t2 - t1))
    return dict(prefill_tok_s=statistics.median(pre), decode_tok_s=statistics.median(dec), tokens=tokens,
                prefill_runs=pre, decode_runs=dec, n_prompt=n_prompt, n_gen=a["n_gen"], threads=a["threads"],
                flash_attn=a["flash_attn"], kv_type=a["kv_type"],
                backend="llama-cpp-python", version=f"llama-cpp-python {llama_cpp.__version__}",
                system_info=llama_cpp.llama_print_system_info().decode().strip())


def _run_xllamacpp(a: dict) -> dict:
    import xllamacpp as xlc
    from xllamacpp import _version

    n_prompt = len(a["prompt"]) if a["prompt"] else a["n_prompt"]
    p = xlc.CommonParams()
    p.model.path = a["path"]
    p.n_ctx = n_prompt + a["n_gen"] + 16
    p.n_batch, p.n_ubatch = max(n_prompt, 1), min(512, n_prompt)
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = a["threads"]
    kv = xlc.ggml_type.GGML_TYPE_F32 if a["kv_type"] == "f32" else xlc.ggml_type.GGML_TYPE_F16
    p.cache_type_k = p.cache_type_v = kv
    fa = xlc.llama_flash_attn_type
    p.flash_attn_type = fa.LLAMA_FLASH_ATTN_TYPE_ENABLED if a["flash_attn"] else fa.LLAMA_FLASH_ATTN_TYPE_DISABLED
    server = xlc.Server(p)
    prompt = a["prompt"] or default_prompt(n_prompt, _gguf_vocab_size(a["path"]))
    pre, dec = [], []
    for i in range(a["repeats"] + 1):  # the first request is the warm-up
        # top_k=1 is greedy; logprobs is the only place the OpenAI-style reply carries token ids.
        r = server.handle_completions(dict(prompt=prompt, n_predict=a["n_gen"], max_tokens=a["n_gen"],
                                           temperature=0.0, top_k=1, ignore_eos=True, cache_prompt=False,
                                           logprobs=1))
        if "error" in r:
            raise RuntimeError(f"xllamacpp: {r['error']}")
        if i == 0:
            continue
        t = r["timings"]
        pre.append(t["prompt_per_second"])
        dec.append(t["predicted_per_second"])
        tokens = [c["id"] for c in r["choices"][0]["logprobs"]["content"]]
    if len(tokens) != a["n_gen"]:
        # The reply folds a token that ends mid-UTF-8 character into the next entry, dropping its id.
        tokens = None
    return dict(prefill_tok_s=statistics.median(pre), decode_tok_s=statistics.median(dec), tokens=tokens,
                prefill_runs=pre, decode_runs=dec, n_prompt=n_prompt, n_gen=a["n_gen"], threads=a["threads"],
                flash_attn=a["flash_attn"], kv_type=a["kv_type"],
                backend="xllamacpp", version=f"xllamacpp {_version.get_versions()['version']}",
                system_info=xlc.get_system_info().strip())


def _gguf_vocab_size(path: str) -> int:
    import gguf

    return len(gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].data)


def main(argv=None):
    p = argparse.ArgumentParser(description="llama.cpp prefill/decode speed on a GGUF (in a subprocess)")
    p.add_argument("gguf", nargs="?")
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    p.add_argument("--no-flash-attn", action="store_true", help="llama.cpp's default is flash attention on (CPU)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(json.loads(sys.stdin.read()))))
        return
    if not a.gguf:
        p.error("a GGUF path is needed")
    r = run_llamacpp(a.gguf, a.n_prompt, a.n_gen, a.threads, a.repeats, backend=a.backend,
                     flash_attn=not a.no_flash_attn)
    print(json.dumps({k: v for k, v in r.items() if k != "tokens"}, indent=1))


if __name__ == "__main__":
    main()
