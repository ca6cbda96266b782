"""``python -m mhr_jax.train --gin_file=... [--gin.X=V ...] [--dry_run]``.

Flags as in t5x: ``--gin_file`` (repeatable, applied in order, later files override earlier ones),
``--gin_search_path`` (repeatable; where relative gin paths and includes are looked up first,
before ``gin_configs/``, the repository root and, last, the working directory),
``--gin.NAME=VALUE`` (one binding each, applied after the files), ``--dry_run`` (parse, print
the operative configuration, exit), ``--compilation_cache=PATH|off`` (JAX's persistent
compilation cache, on by default: ``mhr_jax.compilation_cache``). Multi-host runs call
``jax.distributed.initialize`` when ``--coordinator_address`` (or ``MHR_COORDINATOR_ADDRESS``)
is given (``--distributed=auto`` on TPU pods); ``--distributed_timeout`` (or
``MHR_DISTRIBUTED_TIMEOUT``, seconds) bounds the wait for the other processes. What runs is
``main_entry.entry``: ``@trainer.run`` for one run, or an experiment's pipeline.

An expected failure (``errors.MhrError``: configuration, data, checkpoint, file system; gin's own
configuration errors; an operating-system error on a path) is reported as one message on stderr,
with exit status 1; ``--traceback`` shows its traceback instead. Any other exception is a defect
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import re
import sys
from typing import Optional, Sequence

import gin

from mhr_jax import errors

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m mhr_jax.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="directory searched for gin files and includes (repeatable)")
  parser.add_argument("--dry_run", action="store_true",
                      help="parse the configuration, print it, and exit")
  parser.add_argument("--traceback", action="store_true",
                      help="show the traceback of an expected failure instead of its message")
  parser.add_argument("--compilation_cache", default=None,
                      help="folder of JAX's persistent compilation cache, or 'off' (default: "
                           "$MHR_COMPILATION_CACHE, else ~/.cache/mhr_jax/jax)")
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
  in ``gin_search_dirs``. Raises ``errors.MissingFileError`` listing the folders searched."""
  path = pathlib.Path(name)
  if path.is_absolute() or name.startswith(("./", "../")):
    candidates = [path]
  else:
    candidates = [d / path for d in gin_search_dirs(search_paths)]
  for candidate in candidates:
    if candidate.is_file():
      return str(candidate.resolve())
  raise errors.MissingFileError(
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
  """Registers the configurables, then parses files and bindings (t5x semantics).

  Raises ``errors.ConfigError`` for anything gin refuses (an unknown configurable or parameter,
  a syntax error, a required macro left unset) and ``errors.MissingFileError`` for a gin file
  that is not found.
  """
  from mhr_jax import experiments, trainer  # noqa: F401  (registers the gin configurables)

  files = [resolve_gin_file(f, search_paths) for f in gin_files]  # names a missing file first
  try:
    with _gin_lookup(search_paths):
      # File by file (as gin.parse_config_files_and_bindings does), noting the adapter knobs.
      knobs = []
      for f in files:
        gin.parse_config_file(f)
        knobs.append(_adapter_knobs())
      gin.parse_config(bindings)
    check_adapter_knobs(gin_files, files, knobs, bindings)
    gin.finalize()
  except errors.MhrError:
    raise
  except Exception as e:  # gin reports configuration errors as built-in exceptions
    raise errors.ConfigError(_gin_message(str(e))) from e


# The macros the generic adapters/<mode>.gin files set, each to its own default value.
ADAPTER_KNOBS = ("N_SKILLS", "N_SPLITS", "LORA_RANK", "ADAPTED_LAYERS")
_UNSET = object()


def _adapter_knobs() -> dict:
  """{knob: value} of the ``ADAPTER_KNOBS`` gin binds so far."""
  out = {}
  for name in ADAPTER_KNOBS:
    try:
      out[name] = gin.query_parameter(f"{name}/gin.macro.value")
    except ValueError:
      pass
  return out


def check_adapter_knobs(names: Sequence[str], files: Sequence[str], knobs: Sequence[dict],
                        bindings: Sequence[str]) -> None:
  """Refuses an ``adapters/<mode>.gin`` that silently resets a knob an earlier file chose.

  The generic adapter files set N_SKILLS, N_SPLITS, LORA_RANK and ADAPTED_LAYERS to their own
  defaults, so ``experiments/t0_pretrain.gin`` followed by ``adapters/mhr_z.gin`` runs S = 8 instead
  of the preset's 64: another model (other heads, other parameter counts) that nothing reports,
  and for fine-tuning a mismatch with the checkpoint. A refusal, not a warning, since the run it
  would start is not the one asked for; a later file or a ``--gin.KNOB=...`` binding that sets the
  knob again says what is meant and passes.

  Args:
    names: the gin files as given; files: the same, resolved; knobs: ``_adapter_knobs()`` after
      each file; bindings: the ``--gin.`` bindings, parsed after the files.
  """
  rebound = {k for k in ADAPTER_KNOBS for b in bindings if re.match(rf"\s*{k}\s*=", b)}
  for i in range(1, len(files)):
    if pathlib.Path(files[i]).parent.name != "adapters":
      continue
    before, after = knobs[i - 1], knobs[i]
    for knob in ADAPTER_KNOBS:
      old, new = before.get(knob, _UNSET), after.get(knob, _UNSET)
      later = [k.get(knob, _UNSET) for k in knobs[i + 1:]]
      if old is _UNSET or old == new or knob in rebound or any(v != new for v in later):
        continue
      setter = next(names[j] for j in range(i - 1, -1, -1)
                    if j == 0 or knobs[j - 1].get(knob, _UNSET) != knobs[j].get(knob, _UNSET))
      overlay = f"overlays/method_{pathlib.Path(files[i]).stem}.gin"
      use = (f"--gin_file={overlay}" if (REPO_ROOT / "gin_configs" / overlay).is_file()
             else "the preset without it (its method is set already)")
      raise errors.ConfigError(
          f"{names[i]} sets {knob} = {new!r} after {setter} set it to {old!r}: the generic "
          f"adapter files reset their knobs. The presets switch method with "
          f"gin_configs/overlays/method_*.gin, which keep {knob}: use {use} instead of "
          f"{names[i]}, or say which value you mean with --gin.{knob}=... after the files")


def _gin_message(text: str) -> str:
  """gin's error text, with its required-macro error said in terms of the command line."""
  unset = re.match(r"(\w+)/macro\.value set to `%gin\.REQUIRED` but not subsequently overridden",
                   text)
  if unset:
    name = unset.group(1)
    return (f"the required gin macro {name} is not set: add --gin.{name}=... or bind it in a "
            "gin file")
  return f"gin configuration: {text}"


def failure_message(e: BaseException) -> Optional[str]:
  """The report of an expected failure, or None for a defect (which keeps its traceback).

  gin appends the configurables a failure passed through ("In call to configurable 'run'
  (<function ...>)"); those lines are dropped.
  """
  text = str(e)
  if isinstance(e, RuntimeError) and text.startswith("Required bindings for"):
    text = _gin_message(text)  # a configurable's gin.REQUIRED parameter left unbound
  elif not isinstance(e, (errors.MhrError, OSError)):
    return None
  lines = [line for line in text.splitlines() if not line.strip().startswith(
      "In call to configurable")]
  return "\n".join(lines).strip() or type(e).__name__


def dry_run_counts() -> str:
  """The parameter counts and state per device of the configured ``trainer.run``, from
  ``jax.eval_shape`` (``aot.check_run`` without compiling): nothing is allocated, so a T5-XL
  preset reports on a laptop. Routing rows are the mixture's tasks when it is registered, else
  one (a fine-tuning run's row)."""
  from mhr_jax import aot

  try:
    entry = gin.query_parameter("main_entry.entry")
  except ValueError:
    entry = None
  if getattr(getattr(entry, "configurable", None), "name", None) != "run":
    return "# parameter counts: the entry is not a single run (see each stage's own --dry_run)"
  try:
    args = aot.configured_run(None)
    rows = "the mixture's tasks"
  except errors.ConfigError:
    args, rows = aot.configured_run(1), "1 (the mixture is not registered here)"
  report = aot.check_run(args, compile_step=False)
  lines = [f"from eval_shape, routing rows: {rows}", *aot.format_report(report).splitlines()]
  return "\n".join(f"# {line}" for line in lines)


@gin.configurable
def main_entry(entry=gin.REQUIRED, dry_run: bool = False):
  """Runs ``entry`` (a gin-configured callable taking ``dry_run``)."""
  return entry(dry_run=dry_run)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: returns the exit status (1 for an expected failure, reported on stderr)."""
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  try:
    _run(args)
  except Exception as e:
    message = failure_message(e)
    if message is None or args.traceback:
      raise
    print(f"error: {message}\n(run again with --traceback for where it happened)",
          file=sys.stderr)
    return 1
  return 0


def _run(args: argparse.Namespace) -> None:
  from mhr_jax import console

  console.quiet_tensorflow()  # before anything imports TensorFlow
  console.collapse_repeated_warnings()
  from mhr_jax import compilation_cache, sharding

  compilation_cache.configure(args.compilation_cache)
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
    print(dry_run_counts())
  with sharding.exit_when_peers_are_lost(args.coordinator_address or "auto-detected"):
    main_entry(dry_run=args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
