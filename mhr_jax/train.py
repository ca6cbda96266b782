"""``python -m mhr_jax.train --gin_file=... [--gin.X=V ...] [--dry_run]``.

Flags as in t5x: ``--gin_file`` (repeatable, applied in order, later files override earlier ones),
``--gin_search_path`` (repeatable; where relative gin paths and includes are looked up first,
before ``gin_configs/``, the repository root and, last, the working directory), ``--gin.NAME=VALUE`` (one binding each, applied after the files),
``--dry_run`` (parse, print the operative configuration, exit). Multi-host runs call
``jax.distributed.initialize`` when ``--coordinator_address`` (or ``MHR_COORDINATOR_ADDRESS``)
is given (``--distributed=auto`` on TPU pods); ``--distributed_timeout`` (or
``MHR_DISTRIBUTED_TIMEOUT``, seconds) bounds the wait for the other processes. What runs is
``main.entry``: ``@trainer.run`` for one run, or an experiment's pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from typing import Sequence

import gin

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m mhr_jax.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="directory searched for gin files and includes (repeatable)")
  parser.add_argument("--dry_run", action="store_true",
                      help="parse the configuration, print it, and exit")
  parser.add_argument("--distributed", choices=("off", "auto"), default="off",
                      help="auto: jax.distributed.initialize() reading the topology (TPU pods)")
  parser.add_argument("--coordinator_address", default=os.environ.get("MHR_COORDINATOR_ADDRESS"))
  parser.add_argument("--num_processes", type=int,
                      default=int(os.environ.get("MHR_NUM_PROCESSES", "0")) or None)
  parser.add_argument("--process_id", type=int,
                      default=int(os.environ["MHR_PROCESS_ID"]) if "MHR_PROCESS_ID" in os.environ
                      else None)
  parser.add_argument("--distributed_timeout", type=float, default=None,
                      help="seconds to wait for the other processes before exiting with a message "
                           "(default: $MHR_DISTRIBUTED_TIMEOUT, else 300)")
  args, rest = parser.parse_known_args(argv)
  args.gin_bindings = []
  for item in rest:
    if item.startswith("--gin.") and "=" in item:
      args.gin_bindings.append(item[len("--gin."):])
    else:
      parser.error(f"unrecognised argument {item!r} (gin bindings are --gin.NAME=VALUE)")
  if not args.gin_file:
    parser.error("at least one --gin_file is required")
  return args


def gin_search_dirs(search_paths: Sequence[str] = ()) -> list[pathlib.Path]:
  """Where relative gin paths (``--gin_file`` and ``include``) are looked up, in order.

  The user's ``--gin_search_path`` folders, then the project's ``gin_configs/`` and root, and the
  working directory last, so that a folder of the working directory named like a config folder
  (``runs/``, the default job's outputs, or ``models/``) can neither shadow nor break a config.
  """
  dirs = [*(pathlib.Path(p) for p in search_paths), REPO_ROOT / "gin_configs", REPO_ROOT,
          pathlib.Path.cwd()]
  return list(dict.fromkeys(d.absolute() for d in dirs))


def resolve_gin_file(name: str, search_paths: Sequence[str] = ()) -> str:
  """The file a gin path names: absolute or ``./``-relative paths as given, else the first hit
  in ``gin_search_dirs``. Raises ``FileNotFoundError`` listing the folders searched."""
  path = pathlib.Path(name)
  if path.is_absolute() or name.startswith(("./", "../")):
    candidates = [path]
  else:
    candidates = [d / path for d in gin_search_dirs(search_paths)]
  for candidate in candidates:
    if candidate.is_file():
      return str(candidate.resolve())
  raise FileNotFoundError(
      f"gin file not found: {name} (looked in {', '.join(str(c.parent) for c in candidates)})")


@contextlib.contextmanager
def _gin_lookup(search_paths: Sequence[str]):
  """Makes gin resolve every file, includes too, with ``resolve_gin_file`` and nothing else.

  gin's own lookup tries the working directory first and then its Python-package reader, which
  takes ``runs/pretrain.gin`` for package ``runs`` and crashes on a folder ``runs/`` that Python
  can import as a namespace package. gin (0.5) offers no public way to replace its readers, so
  its reader list and search prefixes are swapped for the duration of the parse.
  """
  from gin import config as gin_config

  saved = gin_config._FILE_READERS[:], gin_config._LOCATION_PREFIXES[:]
  gin_config._FILE_READERS[:] = [
      (lambda name: open(resolve_gin_file(name, search_paths)), lambda name: True)]
  gin_config._LOCATION_PREFIXES[:] = [""]
  try:
    yield
  finally:
    gin_config._FILE_READERS[:], gin_config._LOCATION_PREFIXES[:] = saved


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]):
  """Registers the configurables, then parses files and bindings (t5x semantics)."""
  from mhr_jax import experiments, trainer  # noqa: F401  (registers the gin configurables)

  files = [resolve_gin_file(f, search_paths) for f in gin_files]  # names a missing file first
  with _gin_lookup(search_paths):
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
  gin.finalize()


@gin.configurable
def main_entry(entry=gin.REQUIRED, dry_run: bool = False):
  """Runs ``entry`` (a gin-configured callable taking ``dry_run``)."""
  return entry(dry_run=dry_run)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  from mhr_jax import sharding

  if args.distributed == "auto":
    import jax

    jax.distributed.initialize()
  else:
    sharding.maybe_initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id,
        timeout_s=args.distributed_timeout)
  parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
  if args.dry_run:
    print(gin.config_str())
  with sharding.exit_when_peers_are_lost(args.coordinator_address or "auto-detected"):
    main_entry(dry_run=args.dry_run)
  return 0


if __name__ == "__main__":
  sys.exit(main())
