"""The persistent compilation cache: where it goes, switching it off, that programs land there."""

import os
import pathlib
import subprocess
import sys

from mhr_jax import compilation_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_folder_rules(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation_cache.resolve() == str(tmp_path / "xdg" / "mhr_jax" / "jax")
  monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
  assert compilation_cache.resolve() == str(tmp_path / "env")
  assert compilation_cache.resolve(str(tmp_path / "flag")) == str(tmp_path / "flag")  # flag wins
  assert compilation_cache.resolve("off") is None
  monkeypatch.setenv(compilation_cache.ENV, "OFF")
  assert compilation_cache.resolve() is None


def test_programs_are_written_to_the_cache(tmp_path):
  code = ("from mhr_jax import compilation_cache; import jax, jax.numpy as jnp; "
          "print(compilation_cache.configure()); "
          "jax.jit(lambda x: jnp.tanh(x) @ x)(jnp.ones((8, 8))).block_until_ready()")
  env = {**os.environ, compilation_cache.ENV: str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == str(tmp_path / "cache")
  assert any(p.name.startswith("jit_") for p in (tmp_path / "cache").iterdir())
