"""hyprjax.xla_flags: the XLA:CPU flag hyprjax adds at import, only where this jaxlib knows it
(an unknown flag in XLA_FLAGS aborts the process)."""

import subprocess
import sys

from hyprjax import xla_flags


def test_the_flag_is_found_in_this_jaxlib_without_the_version_shortcut(monkeypatch, tmp_path):
    monkeypatch.setattr(xla_flags, "KNOWN", ())
    monkeypatch.setenv("HYPRJAX_CACHE_DIR", str(tmp_path))
    assert xla_flags._jaxlib_has(xla_flags.FLAG)
    assert not xla_flags._jaxlib_has("xla_cpu_no_such_flag_" + "x" * 8)
    assert (tmp_path / "xla_flags.json").exists()  # looked up once, then remembered


def _flags_seen(env_extra: dict) -> str:
    code = "import os, hyprjax, jax; jax.numpy.ones(1).block_until_ready(); print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("XLA_FLAGS", "HYPRJAX_XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **env_extra}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_import_adds_the_flag_keeps_the_users_and_can_be_turned_off():
    assert _flags_seen({}) == f"--{xla_flags.FLAG}=false"
    mine = f"--{xla_flags.FLAG}=true --xla_cpu_enable_fast_math=false"
    assert _flags_seen({"XLA_FLAGS": mine}) == mine  # the user's setting wins
    assert _flags_seen({"HYPRJAX_XLA_FLAGS": "0"}) == ""
