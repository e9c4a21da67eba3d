"""llama.cpp's ISA cmake flags come from /proc/cpuinfo flags, never a fixed list (bench/llamacpp.py)."""

from __future__ import annotations

from bench.llamacpp import ISA_OPTIONS, cpu_flags, ggml_cmake_flags, install_command, llama_server_path

AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi2 avx2"
AVX512 = "avx512f avx512cd avx512vl avx512dq avx512bw"


def _options(flags: str) -> dict[str, str]:
    return dict(f.removeprefix("-D").split("=") for f in ggml_cmake_flags(flags.split()))


def test_generic_avx2_cpu():
    on = {k for k, v in _options(AVX2).items() if v == "ON"}
    assert on == {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C"}


def test_amd_epyc_with_avx512_vnni_but_no_avx_vnni():
    """The CPU that died of SIGILL in a build with GGML_AVX_VNNI=ON."""
    o = _options(f"{AVX2} {AVX512} avx512vbmi avx512_vnni avx512_bf16 avx512_vbmi2")
    assert o["GGML_AVX_VNNI"] == "OFF"
    assert o["GGML_AVX512"] == o["GGML_AVX512_VNNI"] == o["GGML_AVX512_BF16"] == o["GGML_AVX512_VBMI"] == "ON"


def test_avx_vnni_without_avx512():
    o = _options(f"{AVX2} avx_vnni")
    assert o["GGML_AVX_VNNI"] == "ON"
    assert all(o[k] == "OFF" for k in ISA_OPTIONS if k.startswith("GGML_AVX512"))


def test_avx512_needs_all_five_foundation_flags():
    """GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw: without avx512bw it and its extensions stay off."""
    o = _options(f"{AVX2} avx512f avx512cd avx512vl avx512dq avx512_vnni avx512_bf16")
    assert all(o[k] == "OFF" for k in ISA_OPTIONS if k.startswith("GGML_AVX512"))


def test_native_off_and_amx_off_even_when_claimed():
    o = _options(f"{AVX2} {AVX512} amx_tile amx_int8 amx_bf16")
    assert o["GGML_NATIVE"] == "OFF"
    assert o["GGML_AMX_TILE"] == o["GGML_AMX_INT8"] == o["GGML_AMX_BF16"] == "OFF"


def test_cpu_flags_reads_the_first_processor():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx_vnni\n\n"
            "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(text) == {"fpu", "avx2", "avx_vnni"}
    assert cpu_flags("processor\t: 0\n") == set()  # no flags line (not x86): every ISA option off
    assert all(v == "OFF" for k, v in _options("").items())


def test_install_command_and_cache_path_follow_the_flags(tmp_path):
    assert "-DGGML_AVX_VNNI=OFF" in install_command(AVX2.split())
    a = llama_server_path(tmp_path, AVX2.split())
    b = llama_server_path(tmp_path, f"{AVX2} avx_vnni".split())
    assert a.parent == b.parent == tmp_path and a != b  # a build for one CPU is never reused on another
