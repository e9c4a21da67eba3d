"""Bad input gets one clear line naming the file, field or value; the CLI exits 2, no traceback."""

import json
import shutil

import gguf
import numpy as np
import pytest

from tests.tiny_models import make_hf_model
from hyprjax.cli import main
from hyprjax.config import ModelConfig
from hyprjax.errors import ConfigError, ModelFileError
from hyprjax.formats.load import load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    make_hf_model(d, "qwen3")
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("hyprjax: error: ")
    return err[-1]


def test_missing_path(tmp_path, capsys):
    msg = _cli_error(["info", str(tmp_path / "nothing-here")], capsys)
    assert "nothing-here" in msg and "no such file or directory" in msg


def test_directory_without_config(tmp_path, capsys):
    assert "no config.json" in _cli_error(["info", str(tmp_path)], capsys)


def test_unknown_architecture(model_dir, tmp_path, capsys):
    d = _copy(model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    assert "'mamba'" in _cli_error(["info", str(d)], capsys)


def test_config_field_out_of_range(model_dir, tmp_path, capsys):
    d = _copy(model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _cli_error(["info", str(d)], capsys)
    assert "num_heads=4" in msg and "num_kv_heads=3" in msg
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        ModelConfig.from_hf({**cfg, "num_key_value_heads": 2, "rms_norm_eps": -1.0})
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf({**cfg, "num_key_value_heads": 2, "hidden_size": 0})


def test_truncated_safetensors(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated.*model.safetensors|model.safetensors.*truncated"):
        load_model(d, with_tokenizer=False, progress=False)


def _rewrite_without(d, drop: str, reshape: str | None = None):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:, :-1].copy()
    save_file(tensors, d / "model.safetensors")


def test_missing_tensor(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    _rewrite_without(d, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelFileError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(d, with_tokenizer=False, progress=False)


def test_misshaped_tensor(model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(model_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"][:, :-1].copy()
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"o_proj.weight' has shape \[64, 95\], expected \[64, 96\]"):
        load_model(d, with_tokenizer=False, progress=False)


def _write_gguf(path, arch="qwen3", ttype=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.ones((32, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if ttype is not None:  # patch the first tensor's type id in place to an unknown value
        data = bytearray(path.read_bytes())
        name = b"token_embd.weight"
        at = data.find(name) + len(name)
        n_dims = int.from_bytes(data[at:at + 4], "little")
        at += 4 + 8 * n_dims
        data[at:at + 4] = int(ttype).to_bytes(4, "little")
        path.write_bytes(bytes(data))


def test_gguf_with_unknown_architecture(tmp_path, capsys):
    f = tmp_path / "m.gguf"
    _write_gguf(f, arch="rwkv7")
    assert "'rwkv7'" in _cli_error(["info", str(f)], capsys)


def test_truncated_gguf(tmp_path, capsys):
    f = tmp_path / "m.gguf"
    _write_gguf(f)
    f.write_bytes(f.read_bytes()[:-64])
    msg = _cli_error(["info", str(f)], capsys)
    assert "m.gguf" in msg and "truncated" in msg
    f.write_bytes(f.read_bytes()[:40])
    assert "truncated" in _cli_error(["info", str(f)], capsys)


def test_gguf_with_unknown_tensor_type(tmp_path, capsys):
    f = tmp_path / "m.gguf"
    _write_gguf(f, ttype=99)
    msg = _cli_error(["info", str(f)], capsys)
    assert "unknown GGUF tensor type" in msg and "99" in msg


def test_not_a_model_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    assert "not a model" in _cli_error(["info", str(f)], capsys)
    g = tmp_path / "fake.gguf"
    g.write_text("hello there")
    assert "not a GGUF file" in _cli_error(["info", str(g)], capsys)


def test_hub_id_offline_names_local_forms(capsys):
    msg = _cli_error(["info", "Qwen/Qwen3-definitely-not-cached"], capsys)
    assert "Qwen/Qwen3-definitely-not-cached" in msg and ".gguf file" in msg


def test_prompt_longer_than_the_context_from_the_cli(model_dir, tmp_path, capsys):
    from bench.make_model import build_tokenizer

    d = _copy(model_dir, tmp_path)
    build_tokenizer(320).save(str(d / "tokenizer.json"))
    msg = _cli_error(["generate", str(d), "-p", "one two three four five six seven eight nine ten",
                      "--max-model-len", "8"], capsys)
    assert "tokens, but the context holds 8" in msg


def test_gguf_header_faults_name_the_cause(tmp_path, capsys):
    f = tmp_path / "m.gguf"
    _write_gguf(f)
    data = bytearray(f.read_bytes())
    data[4:8] = (4).to_bytes(4, "little")  # a GGUF version we do not read
    f.write_bytes(bytes(data))
    msg = _cli_error(["info", str(f)], capsys)
    assert "GGUF version 4 is not supported" in msg and "corrupt" not in msg
    w = gguf.GGUFWriter(str(f), "qwen3")
    w.add_uint32("general.alignment", 0)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "general.alignment=0" in _cli_error(["info", str(f)], capsys)


def test_safetensors_header_that_lies_about_sizes(model_dir, tmp_path):
    import struct

    d = _copy(model_dir, tmp_path)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] * 2]
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(ModelFileError, match="model.norm.weight' spans .* bytes, but shape"):
        load_model(d, with_tokenizer=False, progress=False)
