"""`ollama:NAME[:TAG]` models from a local store laid out as Ollama lays it out (built here)."""

import hashlib
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from bench.make_model import make_model
from hyprjax.errors import ModelFileError
from hyprjax.formats import ollama
from hyprjax.formats.load import load_model


def _put(store, ref_parts, gguf_path, *, layers_extra=(), size_delta=0):
    """Store `gguf_path` as a blob and write a manifest for (host, namespace, name, tag)."""
    data = gguf_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf_path, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / "/".join(ref_parts)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
              {"mediaType": ollama.MODEL_LAYER, "digest": f"sha256:{digest}", "size": len(data) + size_delta},
              *layers_extra]
    manifest.write_text(json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "1" * 64, "size": 2},
                                    "layers": layers}))
    return store / "blobs" / f"sha256-{digest}"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return make_model("tiny", "Q8_0", tmp_path_factory.mktemp("ollama-src") / "tiny.gguf", progress=False)


@pytest.fixture
def store(tmp_path, monkeypatch, gguf_file):
    root = tmp_path / "ollama-models"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    _put(root, ("registry.ollama.ai", "library", "tiny", "q8"), gguf_file)
    _put(root, ("registry.ollama.ai", "someone", "tiny", "latest"), gguf_file)
    _put(root, ("hf.co", "org", "tiny-GGUF", "Q8_0"), gguf_file)
    return root


def test_references_parse_as_ollama_names_them():
    assert ollama.parse_ref("ollama:qwen3") == ("registry.ollama.ai", "library", "qwen3", "latest")
    assert ollama.parse_ref("qwen3:0.6b") == ("registry.ollama.ai", "library", "qwen3", "0.6b")
    assert ollama.parse_ref("user/m:q4") == ("registry.ollama.ai", "user", "m", "q4")
    assert ollama.parse_ref("hf.co/org/repo:Q4_K_M") == ("hf.co", "org", "repo", "Q4_K_M")
    for bad in ("ollama:", "ollama:../x", "ollama::tag"):
        with pytest.raises(ModelFileError, match="not an Ollama model name"):
            ollama.parse_ref(bad)


def test_a_store_model_loads_as_its_gguf(store, gguf_file):
    ours, direct = load_model("ollama:tiny:q8", progress=False), load_model(gguf_file, progress=False)
    ids = jnp.asarray([[5, 9, 17, 3]])
    pos = jnp.arange(4)[None]
    np.testing.assert_array_equal(np.asarray(ours.model(ids, pos)[0]), np.asarray(direct.model(ids, pos)[0]))
    assert ours.tokenizer.encode("hello world") == direct.tokenizer.encode("hello world")
    assert load_model("ollama:someone/tiny", progress=False).path == ours.path  # :latest, another namespace
    assert load_model("ollama:hf.co/org/tiny-GGUF:Q8_0", progress=False).path == ours.path


def test_the_store_is_listed(store):
    assert ollama.list_ollama() == ["ollama:hf.co/org/tiny-GGUF:Q8_0", "ollama:someone/tiny:latest",
                                    "ollama:tiny:q8"]
    assert ollama.served_name("ollama:tiny:q8") == "tiny:q8"


def test_errors_name_what_is_wrong(store, gguf_file, tmp_path):
    with pytest.raises(ModelFileError, match=r"ollama:nope:latest: not in Ollama's store .* models there: "
                                             r"ollama:hf.co/org/tiny-GGUF:Q8_0, .*ollama pull nope:latest"):
        load_model("ollama:nope", progress=False)
    _put(store, ("registry.ollama.ai", "library", "short", "x"), gguf_file, size_delta=100)
    with pytest.raises(ModelFileError, match="an interrupted pull"):
        load_model("ollama:short:x", progress=False)
    bad = store / "manifests" / "registry.ollama.ai" / "library" / "broken" / "x"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"layers": [{"mediaType": "application/vnd.ollama.image.license"}]}')
    with pytest.raises(ModelFileError, match="names no model layer"):
        load_model("ollama:broken:x", progress=False)
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"NOPE" * 10)
    _put(store, ("registry.ollama.ai", "library", "notgguf", "x"), not_gguf)
    with pytest.raises(ModelFileError, match="is not a GGUF file"):
        load_model("ollama:notgguf:x", progress=False)


def test_cli_lists_and_reads_store_models(store, capsys):
    from hyprjax.cli import main

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "ollama:tiny:q8", "source": "ollama"}.items() <= next(
        r for r in rows if r["name"] == "ollama:tiny:q8").items()
    assert main(["info", "ollama:tiny:q8"]) == 0
    assert "qwen3" in capsys.readouterr().out
