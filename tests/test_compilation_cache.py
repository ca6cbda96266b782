"""The persistent compilation cache: where it goes, switching it off, that programs land there."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from mhr_jax import compilation_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def no_jax_cache_setting():
  """JAX's own cache setting unset for the test: an earlier test of the session that ran
  ``python -m mhr_jax.train``'s main in-process has configured the cache, and rule 3 would win."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", before)


def test_folder_rules(monkeypatch, tmp_path, no_jax_cache_setting):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation_cache.resolve() == str(tmp_path / "xdg" / "mhr_jax" / "jax")
  monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
  assert compilation_cache.resolve() == str(tmp_path / "env")
  assert compilation_cache.resolve(str(tmp_path / "flag")) == str(tmp_path / "flag")  # flag wins
  assert compilation_cache.resolve("off") is None
  monkeypatch.setenv(compilation_cache.ENV, "OFF")
  assert compilation_cache.resolve() is None
  monkeypatch.delenv(compilation_cache.ENV)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))  # JAX's own setting
  assert compilation_cache.resolve() == str(tmp_path / "jax")


def test_programs_are_written_to_the_cache(tmp_path):
  code = ("from mhr_jax import compilation_cache; import jax, jax.numpy as jnp; "
          "print(compilation_cache.configure()); "
          "jax.jit(lambda x: jnp.tanh(x) @ x)(jnp.ones((8, 8))).block_until_ready()")
  env = {**os.environ, compilation_cache.ENV: str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == str(tmp_path / "cache")
  assert any(p.name.startswith("jit_") for p in (tmp_path / "cache").iterdir())
