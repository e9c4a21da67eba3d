"""Run llama.cpp on a GGUF file in a subprocess: prefill and decode speed, and its greedy tokens.

    python bench/llamacpp.py bench/models/qwen3-0.6b-f16.gguf --threads 2

    python bench/llamacpp.py --build-server        # llama.cpp's llama-server, built for this CPU

The engine runs in a child process, so a crash inside llama.cpp (these VMs advertise AMX and then
kill a process with SIGILL on its first AMX instruction) comes back as an error, never kills the
caller. llama.cpp is built with this CPU's instruction sets read from /proc/cpuinfo
(`ggml_cmake_flags`), never a fixed list: a flag the CPU lacks is a SIGILL at run time.
Both engines are fed token ids, not text, so hyprjax and llama.cpp see identical input.
Prefill is one fresh prompt of `n_prompt` tokens (llama-bench's pp512); decode is greedy batch-1
generation right after that prompt, timed over the n_gen-1 single-token steps after the first
token (the first comes from the prefill logits), as llama.cpp's own "eval time" counts it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

BACKENDS = ("llama-cpp-python", "xllamacpp")
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose sdist (with llama.cpp vendored) we build
CACHE = Path(os.environ.get("HYPRJAX_CACHE", Path.home() / ".cache" / "hyprjax"))

# llama.cpp's x86 cmake options and the /proc/cpuinfo flags each needs. GGML_AVX512 compiles with
# -mavx512f/cd/vl/dq/bw (ggml/src/ggml-cpu/CMakeLists.txt), so it needs all five. AVX-VNNI
# (`avx_vnni`, the VEX form) is not AVX512-VNNI: an AMD EPYC with avx512_vnni but no avx_vnni
# died of SIGILL in a build with GGML_AVX_VNNI=ON.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
ISA_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": _AVX512,
    "GGML_AVX512_VBMI": _AVX512 + ("avx512vbmi",),
    "GGML_AVX512_VNNI": _AVX512 + ("avx512_vnni",),
    "GGML_AVX512_BF16": _AVX512 + ("avx512_bf16",),
}
# AMX stays off whatever the CPU claims: these VMs list amx_* flags and SIGILL on the first AMX op.
AMX_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` of the first processor in /proc/cpuinfo text (the file itself when None)."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def ggml_cmake_flags(flags) -> list[str]:
    """llama.cpp's cmake -D options for a CPU with these /proc/cpuinfo `flags`: native detection off,
    each x86 extension on exactly when the CPU has it, AMX off."""
    have = set(flags)
    isa = [f"-D{opt}={'ON' if all(f in have for f in need) else 'OFF'}" for opt, need in ISA_OPTIONS.items()]
    return ["-DGGML_NATIVE=OFF", *isa, *(f"-D{opt}=OFF" for opt in AMX_OFF)]


def install_command(flags=None) -> str:
    """The pip command that builds llama-cpp-python from source for this CPU (or one with `flags`)."""
    cmake = " ".join(ggml_cmake_flags(cpu_flags() if flags is None else flags) + ["-DLLAMA_CURL=OFF"])
    return (f'CMAKE_ARGS="{cmake}" pip install --no-binary llama-cpp-python '
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}  (docs/llamacpp.md)")


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
    greedy ids of the last repeat.
    Speeds are medians over `repeats` (each run is in `prefill_runs` / `decode_runs`). `kv_type`
    "f32" keeps the KV cache exact (token-equality tests); "f16" is llama.cpp's default. `flash_attn`
    True matches llama.cpp's own default ("auto", which turns it on for the CPU backend).
    Raises LlamaCppError naming the install command if llama.cpp is missing or its process fails.
    """
    if not Path(gguf_path).is_file():
        raise ValueError(f"gguf_path {str(gguf_path)!r} is not a file")
    name = available_backend(backend)
    if name is None:
        raise LlamaCppError(f"llama.cpp ({backend}) is not installed: pip install xllamacpp, or build it "
                            f"with: {install_command()}")
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


def llamacpp_tokenize(gguf_path: str, texts: list[str], *, backend: str = "auto", timeout: float = 600.0) -> list[list[int]]:
    """llama.cpp's token ids for each of `texts` (no BOS, special tokens not parsed), in a subprocess."""
    name = available_backend(backend)
    if name is None:
        raise LlamaCppError(f"llama.cpp ({backend}) is not installed: pip install xllamacpp")
    args = dict(path=str(gguf_path), texts=list(texts), backend=name, tokenize=True)
    p = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(args), text=True,
                       capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise LlamaCppError(f"llama.cpp ({name}) tokenizing with {gguf_path}: exit status {p.returncode}\n"
                            f"{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["tokens"]


# ---- llama-server from source ----------------------------------------------------------------

# Only what llama-server needs, nothing fetched at build time (the web UI would be downloaded).
_SERVER_CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]


def llama_server_path(cache: Path = CACHE, flags=None) -> Path:
    """Where `build_llama_server` keeps the binary for this CPU's flag set (it may not exist yet)."""
    cmake = ggml_cmake_flags(cpu_flags() if flags is None else flags)
    tag = hashlib.sha256(" ".join(cmake + _SERVER_CMAKE).encode()).hexdigest()[:10]
    return Path(cache) / f"llama-server-{LLAMA_CPP_PYTHON}-{tag}"


def build_llama_server(cache: Path = CACHE, jobs: int | None = None) -> Path:
    """llama.cpp's own llama-server, built from llama-cpp-python's sdist with this CPU's ISA flags.

    Cached under `cache` by version and flag set, so a second call returns at once. Needs cmake and
    g++ (apt-get install -y cmake g++); 9 minutes of CPU time, about 5 on 2 idle cores. Progress
    goes to stderr, the full logs beside the build directory. Raises LlamaCppError if a step fails.
    """
    binary = llama_server_path(cache)
    if binary.is_file():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LlamaCppError(f"building llama-server needs {tool}: apt-get install -y cmake g++")
    work = Path(cache) / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        _say(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], work / "download.log")
        sdist = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        _say(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
    flags = ggml_cmake_flags(cpu_flags())
    _say("configuring: " + " ".join(flags))
    build = work / f"build-{binary.name}"
    _run(["cmake", "-S", str(src), "-B", str(build), *flags, *_SERVER_CMAKE], work / f"{build.name}.configure.log")
    jobs = jobs or os.cpu_count() or 2
    log = work / f"{build.name}.log"
    _say(f"building llama-server with {jobs} jobs (log: {log})")
    t0 = time.perf_counter()
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], log, progress=True)
    tmp = binary.with_name(binary.name + ".tmp")
    shutil.copy2(build / "bin" / "llama-server", tmp)
    tmp.replace(binary)  # never a half-copied binary under the final name
    _say(f"built {binary} in {time.perf_counter() - t0:.0f} s")
    return binary


def _say(msg: str) -> None:
    print(f"[llama-server build] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], log_path: Path, progress: bool = False) -> None:
    """Run `cmd` with its output in `log_path`; echo cmake's [ NN%] lines when `progress`."""
    shown = -1
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            log.write(line)
            pct = line[1:4].strip() if line.startswith("[") and line[4:6] == "%]" else ""
            if progress and pct.isdigit() and int(pct) >= shown + 5:
                shown = int(pct)
                _say(line.rstrip()[:120])
    if p.wait() != 0:
        tail = log_path.read_text()[-3000:]
        raise LlamaCppError(f"{cmd[0]} failed (exit status {p.returncode}; log: {log_path}):\n{tail}")


# ---- child process ---------------------------------------------------------------------------

def _worker(a: dict) -> dict:
    if a.get("tokenize"):
        return _tokenize_llama_cpp_python(a) if a["backend"] == "llama-cpp-python" else _tokenize_xllamacpp(a)
    run = _run_llama_cpp_python if a["backend"] == "llama-cpp-python" else _run_xllamacpp
    return run(a)


def _tokenize_llama_cpp_python(a: dict) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(a["path"], vocab_only=True, verbose=False)
    return dict(tokens=[llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in a["texts"]])


def _tokenize_xllamacpp(a: dict) -> dict:
    import urllib.request

    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = a["path"]
    p.n_ctx = 256
    p.hostnames, p.port = ["127.0.0.1"], 0
    server = xlc.Server(p)
    out = []
    for text in a["texts"]:
        body = json.dumps(dict(content=text, add_special=False, parse_special=False)).encode()
        req = urllib.request.Request(server.listening_address + "/tokenize", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as f:
            out.append(json.loads(f.read())["tokens"])
    return dict(tokens=out)


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
    import urllib.error
    import urllib.request

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
    p.hostnames, p.port = ["127.0.0.1"], 0  # llama-server's HTTP listener on a free port
    server = xlc.Server(p)
    prompt = a["prompt"] or default_prompt(n_prompt, _gguf_vocab_size(a["path"]))
    # llama.cpp's native /completion over HTTP, not handle_completions: only the native reply has
    # `return_tokens`, the exact ids (the OpenAI-shaped one drops a token that ends mid-UTF-8 character).
    body = json.dumps(dict(prompt=prompt, n_predict=a["n_gen"], temperature=0.0, top_k=1, ignore_eos=True,
                           cache_prompt=False, return_tokens=True)).encode()
    pre, dec = [], []
    for i in range(a["repeats"] + 1):  # the first request is the warm-up
        req = urllib.request.Request(server.listening_address + "/completion", body,
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=3600) as f:
                r = json.loads(f.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"xllamacpp /completion: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
        if i == 0:
            continue
        pre.append(r["timings"]["prompt_per_second"])
        dec.append(r["timings"]["predicted_per_second"])
        tokens = r["tokens"]
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
    p.add_argument("--build-server", action="store_true",
                   help="build llama.cpp's llama-server for this CPU (cached) and print its path")
    p.add_argument("--print-cmake-flags", action="store_true", help="print this CPU's llama.cpp cmake flags")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(json.loads(sys.stdin.read()))))
        return
    if a.print_cmake_flags:
        print(" ".join(ggml_cmake_flags(cpu_flags())))
        return
    if a.build_server:
        print(build_llama_server())
        return
    if not a.gguf:
        p.error("a GGUF path is needed")
    r = run_llamacpp(a.gguf, a.n_prompt, a.n_gen, a.threads, a.repeats, backend=a.backend,
                     flash_attn=not a.no_flash_attn)
    print(json.dumps({k: v for k, v in r.items() if k != "tokens"}, indent=1))


if __name__ == "__main__":
    main()
