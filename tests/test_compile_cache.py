"""The persistent compilation cache: which directory, and that a second process loads what the first compiled.

Everything that turns the cache on runs in a subprocess with HOME in tmp_path, so neither this
process's JAX nor the real ~/.cache is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hyprjax.cli import build_parser
from hyprjax.compile_cache import ENV_VAR, MIN_SECS_VAR, resolve_cache_dir

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from hyprjax.compile_cache import cache_stats, enable_compile_cache
where = enable_compile_cache(json.loads(sys.argv[1]))
f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(axis=0))
rng = np.random.default_rng(0)
y = f(rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32))
print(json.dumps(dict(where=where and str(where), y=np.asarray(y).tolist(), **cache_stats())))
"""


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "XDG_CACHE_HOME", "JAX_COMPILATION_CACHE_DIR")}
    env.update(HOME=str(tmp_path / "home"), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
    env[MIN_SECS_VAR] = "0"  # the child's one small program must be cached too
    return env


def _child(tmp_path: Path, arg, **env) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(arg)], capture_output=True, text=True,
                       env=_env(tmp_path, **env), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _files(d: Path) -> set[str]:
    return {p.name for p in d.rglob("*") if p.is_file()} if d.exists() else set()


def test_directory_choice(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir(None) == resolve_cache_dir(True) == tmp_path / ".cache" / "hyprjax" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(None) == tmp_path / "xdg" / "hyprjax" / "jax"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_cache_dir(None) == resolve_cache_dir(True) == tmp_path / "env"  # the env var beats XDG
    assert resolve_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"  # an explicit directory beats both
    assert resolve_cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_cache_dir(False) is None
    with pytest.raises(TypeError, match="compile_cache=3"):
        resolve_cache_dir(3)


@pytest.mark.parametrize("command", [["serve"], ["generate", "-p", "x"], ["chat"]])
def test_flags(command):
    p = build_parser()
    assert p.parse_args(command).compile_cache is None
    assert p.parse_args([*command, "--compile-cache", "/c"]).compile_cache == "/c"
    assert p.parse_args([*command, "--no-compile-cache"]).compile_cache is False


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env_dir, flag_dir = tmp_path / "env", tmp_path / "flag"
    first = _child(tmp_path, None, **{ENV_VAR: str(env_dir)})
    written = _files(env_dir)
    assert first["where"] == str(env_dir) and first["misses"] >= 1 and first["hits"] == 0
    assert any(name.startswith("jit_") for name in written), written  # every program, however quick to compile

    second = _child(tmp_path, None, **{ENV_VAR: str(env_dir)})
    assert second["where"] == str(env_dir) and second["hits"] == first["misses"] and second["misses"] == 0
    assert second["y"] == first["y"]  # the loaded executable computes what the compiled one did
    assert _files(env_dir) == written

    flagged = _child(tmp_path, str(flag_dir), **{ENV_VAR: str(env_dir)})  # the flag's directory beats the env var
    assert flagged["where"] == str(flag_dir) and flagged["hits"] == 0 and flagged["misses"] >= 1
    assert _files(flag_dir) and _files(env_dir) == written

    off = _child(tmp_path, False, **{ENV_VAR: str(env_dir)})
    assert (off["where"], off["hits"], off["misses"]) == (None, 0, 0) and _files(env_dir) == written
    assert not (tmp_path / "home").exists()  # nothing went to the (fake) home's ~/.cache


@pytest.mark.parametrize("command", [["serve"], ["generate", "-p", "x"]])
def test_the_cli_turns_the_cache_on_before_loading(tmp_path, command):
    """`serve` enables it itself, `generate` through `LLM(compile_cache=...)`; a missing model then ends the run."""
    flag_dir, env_dir = tmp_path / "flag", tmp_path / "env"
    run = lambda *flags: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "hyprjax.cli", command[0], str(tmp_path / "no-model"), *command[1:], *flags],
        capture_output=True, text=True, env=_env(tmp_path, **{ENV_VAR: str(env_dir)}), timeout=300)
    p = run("--compile-cache", str(flag_dir))
    assert p.returncode == 2 and "no-model" in p.stderr, p.stderr[-2000:]
    assert flag_dir.is_dir() and not env_dir.exists()
    p = run("--no-compile-cache")
    assert p.returncode == 2 and not env_dir.exists()
    p = run()
    assert p.returncode == 2 and env_dir.is_dir()
