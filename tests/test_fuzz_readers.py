"""Malformed model and adapter files end in one clear error, never a traceback.

Hand-built headers cover each case the review found (`n_dims=0`, element counts that overflow,
text where a number is needed, deeply nested arrays, negative / overlapping / gapped SafeTensors
offsets); `hypothesis` then mutates valid files (flipped bytes, truncations, random header JSON)
under a CI-sized budget. The contract: a reader either succeeds or raises a HyprjaxError
(ModelFileError, ConfigError, AdapterError, ...), whose one-line message the CLI and the server
show. Longer, freshly random runs: `bash bench/fuzz.sh`.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from tests.deps import need

hypothesis = need("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bench.make_model import make_model  # noqa: E402
from hyprjax.errors import HyprjaxError  # noqa: E402
from hyprjax.formats.gguf_read import GGUFFile  # noqa: E402
from hyprjax.formats.load import read_config  # noqa: E402
from hyprjax.formats.safetensors_io import SafeTensorsFile  # noqa: E402

EXAMPLES = int(os.environ.get("HYPRJAX_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="HYPRJAX_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---- GGUF ----------------------------------------------------------------------------------

def _kv_str(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


def _gguf(path, kvs: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0, tail: bytes = b"") -> str:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors + tail + bytes(64))
    return str(path)


def _tensor(name: str, dims: tuple[int, ...], type_id: int = 0, offset: int = 0) -> bytes:
    n = name.encode()
    return (struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", type_id, offset))


def _one_line_error(fn, *args, match=None):
    with pytest.raises(HyprjaxError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_gguf_zero_dims(tmp_path):
    _one_line_error(GGUFFile, _gguf(tmp_path / "a.gguf", tensors=_tensor("t", ()), n_tensors=1), match="n_dims=0")


def test_gguf_element_count_overflow(tmp_path):
    path = _gguf(tmp_path / "a.gguf", tensors=_tensor("t", (2**40, 2**40)), n_tensors=1)
    _one_line_error(GGUFFile, path, match="truncated|too large")
    path = _gguf(tmp_path / "b.gguf", tensors=_tensor("t", (32, 0)), n_tensors=1)
    _one_line_error(GGUFFile, path, match="dimension of 0")


def _kv_u32(key: str, value: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 4) + struct.pack("<I", value)


def test_gguf_text_where_a_number_is_needed(tmp_path):
    from pathlib import Path

    kvs = (_kv_str("general.architecture", "qwen3") + _kv_u32("qwen3.attention.head_count", 4)
           + _kv_u32("qwen3.embedding_length", 64) + _kv_u32("qwen3.feed_forward_length", 128))
    for i, bad in enumerate((_kv_str("qwen3.block_count", "many"), _kv_str("qwen3.rope.freq_base", "high"))):
        good = _kv_u32("qwen3.block_count", 2) if i else b""
        path = _gguf(tmp_path / f"{i}.gguf", kvs=kvs + good + bad, n_kv=5 + bool(good),
                     tensors=_tensor("token_embd.weight", (64, 10)), n_tensors=1, tail=bytes(64 * 10 * 4))
        key = ("qwen3.block_count", "qwen3.rope.freq_base")[i]
        _one_line_error(read_config, Path(path), match=f"{key} must be a number")


def test_gguf_deeply_nested_arrays(tmp_path):
    key = b"x"
    nested = struct.pack("<Q", 1) + key + struct.pack("<I", 9)
    for _ in range(5000):  # array of one array of one array ...
        nested += struct.pack("<IQ", 9, 1)
    nested += struct.pack("<IQ", 4, 0)
    _one_line_error(GGUFFile, _gguf(tmp_path / "a.gguf", kvs=nested, n_kv=1), match="nested")


def test_gguf_absurd_counts(tmp_path):
    _one_line_error(GGUFFile, _gguf(tmp_path / "a.gguf", n_kv=2**62), match="count|truncated|corrupt")
    arr = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9) + struct.pack("<IQ", 7, 2**60)  # 2^60 bools
    _one_line_error(GGUFFile, _gguf(tmp_path / "b.gguf", kvs=arr, n_kv=1), match="runs past the end")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_model("tiny", "Q8_0", tmp_path_factory.mktemp("fuzz") / "tiny.gguf", progress=False).read_bytes()


@FUZZ
@given(data=st.data())
def test_gguf_mutations_end_in_one_clear_error(tiny_gguf, tmp_path, data):
    raw = bytearray(tiny_gguf)
    header = min(len(raw), 4096 * 16)  # most of the header: keys, vocabulary, tensor infos
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(4, header - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(8, len(raw)))]
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw))
    try:
        cfg, gf = read_config(path)
        for name in gf.names()[:3]:
            gf.get(name)
    except HyprjaxError as e:
        assert "\n" not in str(e)


# ---- SafeTensors ---------------------------------------------------------------------------

def _st(path, header: dict, data: bytes) -> str:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return str(path)


@pytest.mark.parametrize("offsets,why", [([[-4, 0], [0, 16]], "negative"), ([[0, 16], [8, 24]], "overlap"),
                                         ([[0, 16], [20, 36]], "gap"), ([[4, 20], [20, 36]], "gap")])
def test_safetensors_bad_offsets(tmp_path, offsets, why):
    header = {f"t{i}": {"dtype": "F32", "shape": [4], "data_offsets": o} for i, o in enumerate(offsets)}
    _one_line_error(SafeTensorsFile, _st(tmp_path / "a.safetensors", header, bytes(64)), match=why)


def test_safetensors_shape_overflow_and_bad_types(tmp_path):
    header = {"t": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}
    _one_line_error(SafeTensorsFile, _st(tmp_path / "a.safetensors", header, bytes(16)), match="needs")
    header = {"t": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}
    _one_line_error(SafeTensorsFile, _st(tmp_path / "b.safetensors", header, bytes(16)), match="malformed")
    header = {"t": {"dtype": "F32", "shape": [4], "data_offsets": ["0", 16.5]}}
    _one_line_error(SafeTensorsFile, _st(tmp_path / "c.safetensors", header, bytes(16)), match="malformed")


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                                    max_size=4), max_leaves=12)


@FUZZ
@given(entries=st.dictionaries(st.text(max_size=8), st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "Q4", 7]), "shape": json_values,
     "data_offsets": json_values})), size=st.integers(0, 256))
def test_safetensors_random_headers_end_in_one_clear_error(tmp_path, entries, size):
    path = _st(tmp_path / "r.safetensors", entries, bytes(size))
    try:
        f = SafeTensorsFile(path)
        for name in f.names():
            f.get(name)
    except HyprjaxError as e:
        assert "\n" not in str(e)


# ---- PEFT adapters -------------------------------------------------------------------------

@FUZZ
@given(config=st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "use_dora",
                                               "use_rslora", "fan_in_fan_out", "bias", "layers_to_transform"]),
                              json_values, max_size=9),
       shape=st.lists(st.integers(0, 70), min_size=1, max_size=3))
def test_peft_random_configs_end_in_one_clear_error(tmp_path, config, shape):
    from hyprjax.adapters.load import read_adapter
    from hyprjax.config import PRESETS

    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(config))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    data = np.zeros(int(np.prod(shape)), np.float32).tobytes()
    _st(d / "adapter_model.safetensors", {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, len(data)]}},
        data)
    try:
        read_adapter(str(d), "fuzz", PRESETS["tiny"], 64)
    except HyprjaxError as e:
        assert "\n" not in str(e)
