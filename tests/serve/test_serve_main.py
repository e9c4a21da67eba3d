"""`hyprjax serve` flags and the pure request parsing behind the handlers."""

from __future__ import annotations

import argparse

import pytest

from hyprjax.serve.errors import APIError
from hyprjax.serve.main import add_serve_arguments, parse_bytes
from hyprjax.serve.protocol import params_for, parse_chat, parse_completion


def parser(**existing) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    if existing.get("max_model_len"):
        p.add_argument("--max-model-len", type=int)  # as hyprjax.cli's shared model flags add it
    add_serve_arguments(p)
    return p


def test_defaults():
    a = parser().parse_args([])
    assert (a.host, a.port, a.api_key, a.served_model_name) == ("127.0.0.1", 8000, None, None)
    assert (a.max_num_seqs, a.page_size, a.max_queue, a.attention_backend) == (32, 16, 256, "auto")
    assert a.max_model_len is None and a.num_pages is None and a.kv_cache_memory is None
    assert a.max_num_batched_tokens is None


def test_flags():
    a = parser(max_model_len=True).parse_args(
        ["--host", "0.0.0.0", "--port", "9000", "--api-key", "k", "--served-model-name", "a", "--served-model-name",
         "b", "--max-num-seqs", "8", "--kv-cache-memory", "2GiB", "--attention-backend", "xla", "--max-queue", "4",
         "--max-model-len", "4096", "--max-num-batched-tokens", "512", "--page-size", "32"])
    assert a.served_model_name == ["a", "b"] and a.kv_cache_memory == 2 * 2**30 and a.max_model_len == 4096
    assert (a.host, a.port, a.max_num_seqs, a.attention_backend, a.max_queue) == ("0.0.0.0", 9000, 8, "xla", 4)


@pytest.mark.parametrize("bad", [["--num-pages", "10", "--kv-cache-memory", "1GiB"], ["--max-num-seqs", "0"],
                                 ["--attention-backend", "cuda"], ["--kv-cache-memory", "lots"]])
def test_bad_flags_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(bad)
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_lora_flags():
    a = parser().parse_args(["--lora", "support=adapters/support", "--lora", "x/legal.gguf", "--lora-dir", "x",
                             "--max-loras", "16", "--max-lora-rank", "64"])
    assert a.lora == [("support", "adapters/support"), ("legal", "x/legal.gguf")]
    assert (a.lora_dir, a.max_loras, a.max_lora_rank) == ("x", 16, 64)
    d = parser().parse_args([])
    assert (d.lora, d.lora_dir, d.max_loras, d.max_lora_rank) == ([], None, None, None)


@pytest.mark.parametrize("argv, message", [
    (["--lora", "x=/no/such/adapter"], "does not exist"),
    (["--lora", "x=/tmp", "--lora", "x=/tmp"], "twice"),
    (["--lora-dir", "/no/such/dir"], "no such directory"),
    (["--max-loras", "0", "--lora-dir", "/tmp"], "at least one slot"),
])
def test_serve_refuses_bad_lora_settings_in_one_line(argv, message, tmp_path, capsys):
    """Bad adapters or settings end `hyprjax serve` with exit 2 and one line, before it serves."""
    from bench.make_model import build_tokenizer
    from hyprjax.cli import main
    from tests.tiny_models import make_hf_model

    make_hf_model(tmp_path / "m", "qwen3", vocab_size=320)
    build_tokenizer(320).save(str(tmp_path / "m" / "tokenizer.json"))
    assert main(["serve", str(tmp_path / "m"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hyprjax: error:") and message in err


def test_parse_bytes():
    assert [parse_bytes(t) for t in ("2GiB", "512MiB", "1.5GB", "1000", "3g")] == [
        2 * 2**30, 512 * 2**20, 1_500_000_000, 1000, 3 * 2**30]
    for bad in ("", "GiB", "-1GiB", "2 parsecs", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)


def test_params_for_defaults_seeds_and_limits():
    opts = parse_completion({"prompt": "x", "seed": 10, "stop": "END", "n": 2}).options
    p = params_for(opts, 100, 120, default_max_tokens=16, choice=1, prompt_param="prompt")
    assert (p.max_tokens, p.seed, p.stop) == (16, 11, ("END",))
    assert params_for(opts, 110, 120, default_max_tokens=16, choice=0, prompt_param="prompt").max_tokens == 10
    chat = parse_chat({"messages": [{"role": "user", "content": "x"}]}).options
    assert params_for(chat, 100, 120, default_max_tokens=None, choice=0, prompt_param="messages").max_tokens == 20
    for prompt_len, o in ((120, chat), (100, parse_chat({"messages": [{"role": "user"}], "max_tokens": 21}).options)):
        with pytest.raises(APIError) as e:
            params_for(o, prompt_len, 120, default_max_tokens=None, choice=0, prompt_param="messages")
        assert e.value.status == 400 and e.value.code == "context_length_exceeded" and "120" in e.value.message


def test_chat_options():
    r = parse_chat({"messages": [{"role": "user", "content": None}], "logprobs": True, "top_logprobs": 4,
                    "stream": True, "stream_options": {"include_usage": True}, "add_generation_prompt": False,
                    "chat_template_kwargs": {"enable_thinking": True}, "temperature": 0})
    o = r.options
    assert (o.logprobs, o.stream, o.include_usage, o.sampling.temperature) == (4, True, True, 0.0)
    assert r.template_kwargs == {"enable_thinking": True} and r.add_generation_prompt is False
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).options.logprobs is None
    with pytest.raises(APIError) as e:
        parse_chat({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert e.value.param == "top_logprobs"
    with pytest.raises(APIError) as e:
        parse_chat({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": []}})
    assert e.value.param == "chat_template_kwargs"
