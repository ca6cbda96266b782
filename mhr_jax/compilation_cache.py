"""JAX's persistent compilation cache, on by default for ``python -m mhr_jax.train``.

The first step of a run spends seconds to a minute compiling (the train step, the evaluation
programs, and many small programs while the model is built); a second run of the same shapes,
such as the next run of a few-shot sweep, reads them from the cache instead.

Where the cache lives, first match wins:

1. ``--compilation_cache=PATH`` on the command line (or ``configure(PATH)`` in Python);
2. the environment variable ``MHR_COMPILATION_CACHE``;
3. JAX's own setting, if the user gave one (``JAX_COMPILATION_CACHE_DIR``);
4. ``$XDG_CACHE_HOME/mhr_jax/jax`` (``~/.cache/mhr_jax/jax``).

The value ``off`` (or ``none``, ``0``, ``false``, empty) switches the cache off. Entries are keyed
by the program, the compile options, the devices and the jax version, so a stale entry is never
used; deleting the folder is always safe.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Optional

ENV = "MHR_COMPILATION_CACHE"
OFF = ("", "off", "none", "0", "false", "no")

log = logging.getLogger("mhr_jax.compilation_cache")


def default_dir() -> pathlib.Path:
  """``$XDG_CACHE_HOME/mhr_jax/jax``, ``~/.cache/mhr_jax/jax`` without it."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "mhr_jax" / "jax"


def resolve(path: Optional[str] = None) -> Optional[str]:
  """The cache folder the rules of the module docstring give, or None when switched off."""
  import jax

  for value in (path, os.environ.get(ENV)):
    if value is not None:
      return None if value.strip().lower() in OFF else str(pathlib.Path(value).expanduser())
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  return str(default_dir())


def configure(path: Optional[str] = None) -> Optional[str]:
  """Turns the persistent cache on in the resolved folder (or off); returns the folder or None.

  Every program is cached, however short its compilation: building a model compiles many small
  programs, and together they are seconds of a run's start.
  """
  import jax

  folder = resolve(path)
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    log.info("persistent compilation cache off")
    return None
  pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  log.info("persistent compilation cache in %s", folder)
  return folder
