"""KV pool sizing: budgets in bytes or as a fraction of free memory, pages from a budget, the serve help."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hyprjax.cli import build_parser
from hyprjax.config import PRESETS
from hyprjax.engine import memory
from hyprjax.engine.config import EngineConfig
from hyprjax.engine.memory import kv_pool_pages, page_bytes, parse_kv_memory
from hyprjax.errors import ConfigError
from hyprjax.serve import main as serve_main
from tests.deps import need

TINY = PRESETS["tiny"]  # 2 layers, 2 kv heads, head_dim 32


class FakeDevice:
    def __init__(self, platform, stats=None):
        self.platform, self._stats, self.device_kind = platform, stats, f"fake {platform}"

    def memory_stats(self):
        return self._stats


@pytest.mark.parametrize("text, value", [
    ("512MiB", 512 * 2**20), ("2G", 2 * 2**30), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000),
    ("1073741824", 2**30), ("64k", 64 * 2**10), (" 3 mib ", 3 * 2**20), ("1", 1),
    ("0.25", 0.25), ("1.0", 1.0), (".5", 0.5), ("25%", 0.25), ("100%", 1.0),
])
def test_parse_kv_memory(text, value):
    got = parse_kv_memory(text)
    assert got == value and type(got) is type(value)  # int: bytes, float: a fraction of free memory


@pytest.mark.parametrize("bad", ["", "lots", "GiB", "-1GiB", "0", "0.0", "1.5", "2.", "150%", "0%", "2 parsecs",
                                 "1e9", "0x10"])
def test_parse_kv_memory_refuses(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_kv_memory(bad)


def test_serve_flag_reads_budgets_and_exits_2_on_bad_ones(capsys):
    p = build_parser()
    assert p.parse_args(["serve", "--kv-cache-memory", "2G"]).kv_cache_memory == 2 * 2**30
    assert p.parse_args(["serve", "--kv-cache-memory", "0.25"]).kv_cache_memory == 0.25
    assert p.parse_args(["serve"]).kv_cache_memory is None
    with pytest.raises(SystemExit) as e:
        p.parse_args(["serve", "--kv-cache-memory", "1.5"])
    assert e.value.code == 2 and "'1.5'" in capsys.readouterr().err


@pytest.mark.parametrize("good", [None, 1, 2**40, 0.25, 1.0])
def test_engine_config_accepts(good):
    assert EngineConfig(kv_cache_memory=good).kv_cache_memory == good


@pytest.mark.parametrize("bad", [0, -5, 0.0, 1.5, True, "2GiB", float("nan")])
def test_engine_config_refuses(bad):
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        EngineConfig(kv_cache_memory=bad)


def test_page_bytes_is_k_and_v_over_every_layer():
    # 2 (K, V) x 2 layers x 16 tokens x 2 kv heads x 32 head dim x 4 bytes
    assert page_bytes(TINY, 16, 4) == 2 * 2 * 16 * 2 * 32 * 4 == 16384


@pytest.mark.parametrize("budget, dtype_bytes, pages", [
    (2**20, 4, 64), (2**20 + 16383, 4, 64), (2**20, 2, 128), (3 * 16384 - 1, 4, 2)])
def test_pages_from_bytes(budget, dtype_bytes, pages):
    ecfg = EngineConfig(kv_cache_memory=budget)
    assert kv_pool_pages(TINY, ecfg, dtype_bytes, device=FakeDevice("cpu")) == (pages, 16384 * dtype_bytes // 4)


def test_num_pages_wins_over_the_budget():
    ecfg = EngineConfig(num_pages=7, kv_cache_memory=2**30)
    assert kv_pool_pages(TINY, ecfg, 4, device=FakeDevice("cpu")) == (7, 16384)


def test_fraction_of_free_memory(monkeypatch):
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device=None: 100 * 16384)
    ecfg = EngineConfig(kv_cache_memory=0.25)
    assert kv_pool_pages(TINY, ecfg, 4, device=FakeDevice("cpu")) == (25, 16384)


def test_free_memory_on_an_accelerator_is_limit_minus_in_use():
    gpu = FakeDevice("gpu", dict(bytes_limit=10 * 2**30, bytes_in_use=4 * 2**30))
    assert memory.free_memory_bytes(gpu) == 6 * 2**30
    with pytest.raises(ConfigError, match="in bytes"):
        memory.free_memory_bytes(FakeDevice("tpu", None))


def test_free_memory_on_cpu_is_mem_available():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(memory.free_memory_bytes(FakeDevice("cpu")) - available) < 2**30  # others allocate meanwhile


def test_platform_defaults():
    ecfg = EngineConfig()
    assert kv_pool_pages(TINY, ecfg, 4, device=FakeDevice("cpu")) == (192 * 2**20 // 16384, 16384)
    gpu = FakeDevice("gpu", dict(bytes_limit=1000 * 16384, bytes_in_use=0))
    assert kv_pool_pages(TINY, ecfg, 2, device=gpu) == (int(0.9 * 1000 * 16384) // 8192, 8192)


def test_a_budget_below_two_pages_is_refused():
    ecfg = EngineConfig(kv_cache_memory=2 * 16384 - 1)
    with pytest.raises(ConfigError, match=r"holds 1 of the 2 pages .* >= 32768 bytes"):
        kv_pool_pages(TINY, ecfg, 4, device=FakeDevice("cpu"))


def _serve_help(capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def test_serve_help_counts_the_default_pool_in_tokens(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HYPRJAX_MODELS_DIR", str(tmp_path))
    from hyprjax.default_model import SMOLLM2

    (tmp_path / SMOLLM2.filename).write_bytes(b"")  # only its header is read, through read_config
    monkeypatch.setattr("hyprjax.formats.load.read_config", lambda path: (TINY, None))
    serve_main.default_kv_help.cache_clear()
    try:
        text = _serve_help(capsys)
    finally:
        serve_main.default_kv_help.cache_clear()
    tokens = 192 * 2**20 // 8192 * 16  # a bfloat16 page of TINY: 2 x 2 x 16 x 2 x 32 x 2 bytes
    assert (f"default: 192 MiB on CPU = {tokens:,} tokens of the default model (smollm2-135m-instruct-q4_1, "
            "bfloat16 KV cache)") in text
    assert "0.9 of free memory on GPU/TPU" in text and "fraction of free memory (0.25)" in text


def test_serve_help_without_the_default_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HYPRJAX_MODELS_DIR", str(tmp_path))  # nothing there: nothing is fetched for --help
    serve_main.default_kv_help.cache_clear()
    try:
        text = _serve_help(capsys)
    finally:
        serve_main.default_kv_help.cache_clear()
    assert "(default: 192 MiB on CPU; 0.9 of free memory on GPU/TPU)" in text
    assert not list(tmp_path.iterdir())


def test_serve_help_on_the_real_default_model(capsys):
    from hyprjax.default_model import SMOLLM2, default_model_path

    assert default_model_path() == SMOLLM2.cached  # fetched on first use, as `hyprjax serve` does
    serve_main.default_kv_help.cache_clear()
    # SmolLM2-135M: 30 layers x 3 kv heads x head dim 64; a 16-token page of its bfloat16 cache (the
    # KV dtype auto picks for quantized weights) is 2 x 30 x 16 x 3 x 64 x 2 = 368,640 bytes, and
    # 192 MiB holds 546 of them: 8,736 tokens
    assert "192 MiB on CPU = 8,736 tokens of the default model" in _serve_help(capsys)


def test_tensor_parallel_pages_follow_the_kv_split(monkeypatch):
    """On an accelerator the budget is per device, and a device holds 1/kv_shards of each page:
    4-way kv sharding fits 4x the pages. On CPU all devices share host memory: no change."""
    ecfg = EngineConfig(kv_cache_memory=100 * 16384)
    gpu = FakeDevice("gpu", {"bytes_limit": 10**9, "bytes_in_use": 0})
    assert kv_pool_pages(TINY, ecfg, 4, device=gpu, kv_shards=4) == (400, 16384)
    assert kv_pool_pages(TINY, ecfg, 4, device=gpu, kv_shards=1) == (100, 16384)
    assert kv_pool_pages(TINY, ecfg, 4, device=FakeDevice("cpu"), kv_shards=4) == (100, 16384)


def test_a_draft_models_pool_shares_the_budget():
    """A draft model's pool (engine/spec_draft.py) costs `extra_page_bytes` per page and is not
    sharded: with a draft page a quarter of the target's, a CPU budget of 100 target pages holds
    80; on a 4-way GPU mesh a device holds a quarter of each target page and all of each draft
    page, so 4 x 100 / (1 + 1) = 200 pages fill its budget exactly."""
    ecfg = EngineConfig(kv_cache_memory=100 * 16384)
    assert kv_pool_pages(TINY, ecfg, 4, device=FakeDevice("cpu"), extra_page_bytes=4096) == (80, 16384 + 4096)
    gpu = FakeDevice("gpu", {"bytes_limit": 10**9, "bytes_in_use": 0})
    pages, _ = kv_pool_pages(TINY, ecfg, 4, device=gpu, kv_shards=4, extra_page_bytes=4096)
    assert pages == 200 and pages * (16384 // 4 + 4096) == 100 * 16384


def test_spec_buckets_hold_whole_groups_up_to_the_row_limit():
    assert EngineConfig(speculative="ngram", num_speculative_tokens=7).spec_buckets() == [8, 16]
    assert EngineConfig(speculative="ngram", num_speculative_tokens=2).spec_buckets() == [3, 6, 12, 15]
    assert EngineConfig(speculative="ngram", num_speculative_tokens=4).spec_buckets() == [5, 10, 15]
    assert EngineConfig(speculative="ngram", num_speculative_tokens=15).spec_buckets() == [16]
    assert EngineConfig().spec_buckets() == []


def test_kv_shards_is_the_mesh_size_only_when_kv_heads_divide():
    """Only the mesh's axis sizes matter here, so a stand-in mesh of 2 or 4 "devices" will do."""
    import dataclasses
    from types import SimpleNamespace

    from hyprjax.sharding import TP, kv_shards

    two, four = SimpleNamespace(shape={TP: 2}), SimpleNamespace(shape={TP: 4})
    assert kv_shards(TINY, None) == 1
    assert kv_shards(TINY, two) == 2  # 2 kv heads over 2 devices
    assert kv_shards(TINY, four) == 1  # 2 kv heads do not split 4 ways: the pool is replicated
    assert kv_shards(dataclasses.replace(TINY, num_heads=8, num_kv_heads=4), four) == 4


@pytest.mark.parametrize("setting, compute, quantized, want", [
    ("auto", "float32", False, "float32"), ("auto", "float32", True, "bfloat16"),
    ("auto", "bfloat16", False, "bfloat16"), ("float32", "bfloat16", True, "float32"),
    ("bfloat16", "float32", False, "bfloat16"),
])
def test_kv_cache_dtype_resolves(setting, compute, quantized, want):
    from hyprjax.engine.paged import kv_storage_dtype, resolve_kv_dtype

    assert resolve_kv_dtype(setting, compute, quantized) == want
    bits = want == "bfloat16"
    assert kv_storage_dtype(want, "xla") == ("uint16" if bits else want)  # bfloat16 bits on the XLA path
    assert kv_storage_dtype(want, "pallas") == want


def test_kv_cache_dtype_is_checked_and_reaches_the_cli(capsys):
    with pytest.raises(ConfigError, match="kv_cache_dtype='float16'"):
        EngineConfig(kv_cache_dtype="float16")
    p = build_parser()
    for command in (["serve"], ["generate", "-p", "x"], ["chat"]):
        assert p.parse_args(command + ["--kv-cache-dtype", "bfloat16"]).kv_cache_dtype == "bfloat16"
        assert p.parse_args(command).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit) as e:
        p.parse_args(["serve", "--kv-cache-dtype", "int8"])
    assert e.value.code == 2 and "int8" in capsys.readouterr().err


def test_pool_is_sized_from_the_meshs_fullest_device():
    """A replica's pool is sized from its own devices (data parallel: not from device 0, which an
    earlier replica filled), the fullest one under tensor parallelism; devices are measured only
    for a fractional budget (a device without memory stats is fine with pages or bytes given)."""

    class Mesh:
        def __init__(self, *devices):
            self.devices = np.array(devices, dtype=object)

    roomy, tight = (FakeDevice("gpu", dict(bytes_limit=n * 16384, bytes_in_use=0)) for n in (1000, 100))
    blind = FakeDevice("gpu", None)  # reports no memory stats
    assert memory.pool_devices(None) is None
    half = EngineConfig(kv_cache_memory=0.5)
    assert kv_pool_pages(TINY, half, 4, device=memory.pool_devices(Mesh(roomy))) == (500, 16384)
    assert kv_pool_pages(TINY, half, 4, device=memory.pool_devices(Mesh(roomy, tight))) == (50, 16384)
    for ecfg in (EngineConfig(num_pages=7), EngineConfig(kv_cache_memory=10 * 16384)):
        assert kv_pool_pages(TINY, ecfg, 4, device=memory.pool_devices(Mesh(blind, roomy)))[0] in (7, 10)
    with pytest.raises(ConfigError, match="no memory limit"):
        kv_pool_pages(TINY, half, 4, device=memory.pool_devices(Mesh(blind)))
