"""Telling a complete checkpoint from a damaged or unfinished one, before anything reads it.

orbax commits a step by writing ``commit_success.txt`` into the step's temporary directory and
renaming it to the step number, so a save cut short leaves only a ``*.orbax-checkpoint-tmp-*``
directory. That protects against a crash mid-save, not against what happens to the files later
(a full disk, a partial copy between machines, a truncated file). So every step also carries a
file manifest, ``mhr_manifest.json``, that the primary process writes after every process has
finished writing and before the commit (``write_manifest``): the relative path and size of every
file of the step's items. ``problems`` checks a step against it and parses its JSON items; it
reads only small files and file sizes, so every process can run it, on the shared checkpoint
folder, and reach the same answer before any collective restore starts.

Nothing here deletes: ``move_aside`` moves damaged steps to a sibling folder for people to
inspect.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from etils import epath

MANIFEST = "mhr_manifest.json"
COMMIT_MARKER = "commit_success.txt"  # orbax's commit marker, written just before the rename
TMP_INFIX = ".orbax-checkpoint-tmp"
_MANIFEST_FORMAT = "mhr_jax.checkpoint_manifest/v1"
# JSON items whose contents are parsed, not only sized (path inside the step directory).
JSON_FILES = ("metadata/metadata", "task_table/task_table.json")
# Checkpoint format versions from which a manifest is written (older steps have none).
FIRST_MANIFEST_VERSION = 2


def _item_files(step_dir: epath.Path) -> dict[str, int]:
  """``{relative path: size}`` of every file inside the step's item directories."""
  out = {}
  # Top-level files (orbax's step metadata, the markers) change at the commit: not listed.
  folders = [p for p in step_dir.iterdir() if p.is_dir()]
  while folders:  # epath's rglob refuses '**' (costly on GCS); walk by hand
    folder = folders.pop()
    for path in folder.iterdir():
      if path.is_dir():
        folders.append(path)
      else:
        out[str(path.relative_to(step_dir))] = path.stat().length
  return dict(sorted(out.items()))


def write_manifest(step_dir: epath.PathLike, step: int) -> None:
  """Records the size of every item file of a finished, not yet committed, step directory."""
  step_dir = epath.Path(step_dir)
  manifest = {"format": _MANIFEST_FORMAT, "step": int(step), "files": _item_files(step_dir)}
  (step_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def pending_directory(directory: epath.PathLike, step: int) -> epath.Path:
  """The directory orbax is writing ``step`` into, not yet committed: the newest temporary
  directory on a file system; on a bucket (``gs://``), where orbax writes into the step's own
  folder and commits by adding the marker, that folder."""
  directory = epath.Path(directory)
  found = sorted(p for p in directory.iterdir() if p.name.startswith(f"{step}{TMP_INFIX}"))
  if found:
    return found[-1]
  final = directory / str(step)
  if final.is_dir() and not (final / COMMIT_MARKER).exists():
    return final
  raise FileNotFoundError(f"no uncommitted directory of step {step} in {directory}")


def _read_json(path: epath.Path):
  return json.loads(path.read_text())


def problems(step_dir: epath.PathLike) -> list[str]:
  """What is wrong with a committed step directory; empty when it is intact.

  Checks, in order: orbax's commit marker; that the JSON items parse; and, for steps written
  with a manifest, that every file in it is present with the size it was written with.
  """
  step_dir = epath.Path(step_dir)
  found = []
  if not (step_dir / COMMIT_MARKER).exists():
    found.append(f"no commit marker {COMMIT_MARKER} (its save never finished)")
  meta = None
  for name in JSON_FILES:
    path = step_dir / name
    if not path.exists():
      found.append(f"{name} is missing")
      continue
    try:
      value = _read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
      found.append(f"{name} is not valid JSON ({e})")
      continue
    if name == JSON_FILES[0]:
      meta = value
  manifest_path = step_dir / MANIFEST
  if not manifest_path.exists():
    # Steps of an older format have no manifest; a step of this format without one was
    # committed by something else than CheckpointManager.save (or lost the file).
    if meta is None or int(meta.get("format_version", 1)) >= FIRST_MANIFEST_VERSION:
      found.append(f"no file manifest {MANIFEST}")
    return found
  try:
    files = _read_json(manifest_path)["files"]
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    return found + [f"{MANIFEST} is not a valid manifest ({e})"]
  for name, size in sorted(files.items()):
    path = step_dir / name
    if not path.exists():
      found.append(f"{name} is missing")
    elif (actual := path.stat().length) != size:
      found.append(f"{name} has {actual} bytes, {size} were written")
  return found


@dataclasses.dataclass(frozen=True)
class DamagedStep:
  """A committed step directory that fails ``problems``."""

  step: int
  path: str
  problems: tuple[str, ...]

  def describe(self) -> str:
    return f"step {self.step} ({self.path}): " + "; ".join(self.problems)


def committed_steps(directory: epath.PathLike) -> list[int]:
  """Steps with a directory named by the step number (orbax's finalized names), ascending."""
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def newest_intact(directory: epath.PathLike) -> tuple[Optional[int], list[DamagedStep]]:
  """The newest step that passes ``problems``, and the damaged steps newer than it (newest first).

  Steps older than the one returned are not examined.
  """
  directory = epath.Path(directory)
  damaged = []
  for step in reversed(committed_steps(directory)):
    found = problems(directory / str(step))
    if not found:
      return step, damaged
    damaged.append(DamagedStep(step, str(directory / str(step)), tuple(found)))
  return None, damaged


def quarantine_directory(directory: epath.PathLike) -> epath.Path:
  """Where ``move_aside`` puts damaged steps: a sibling ``<name>_damaged`` folder."""
  directory = epath.Path(directory)
  return directory.parent / f"{directory.name}_damaged"


def move_aside(directory: epath.PathLike, damaged: list[DamagedStep]) -> list[str]:
  """Moves damaged steps out of ``directory`` (nothing is deleted); returns their new paths."""
  target_dir = quarantine_directory(directory)
  target_dir.mkdir(parents=True, exist_ok=True)
  moved = []
  for item in damaged:
    target = target_dir / str(item.step)
    n = 1
    while target.exists():  # an earlier damaged copy of the same step stays
      target = target_dir / f"{item.step}-{n}"
      n += 1
    epath.Path(item.path).rename(target)
    moved.append(str(target))
  return moved
