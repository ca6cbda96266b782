"""The code's shape rules (CONTRIBUTING.md): short functions, short files, mode facts in one table.

Static checks of the source text; they take well under a second.
"""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MODE_NAMES_ALLOWED = {"modes.py"}
# Files over the limit while others rework them, with the reason; remove each when it is split.
PENDING_LONG_FILES: dict[str, str] = {}
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 500


def _library_files():
  """The library's modules and the benchmark package's (top-level ``benchmarks/``)."""
  return sorted(p for folder in ("mhr_jax", "benchmarks") for p in (REPO / folder).rglob("*.py"))


def _functions(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def _code_lines(fn) -> int:
  """Lines of a function, its docstring left out (a long explanation is no long function)."""
  n_lines = fn.end_lineno - fn.lineno + 1
  first = fn.body[0]
  if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
      and isinstance(first.value.value, str):
    n_lines -= first.end_lineno - first.lineno + 1
  return n_lines


def test_no_long_function_without_a_stated_reason():
  """A function of over 60 lines of code says why in its docstring ("Long because ...")."""
  long = []
  for path in _library_files():
    for fn in _functions(path):
      n_lines = _code_lines(fn)
      if n_lines > MAX_FUNCTION_LINES and "Long because" not in (ast.get_docstring(fn) or ""):
        long.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name} ({n_lines} lines)")
  assert not long, long


def test_no_long_file():
  long = [f"{p.relative_to(REPO)} ({n} lines)" for p in _library_files()
          if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
          and p.name not in PENDING_LONG_FILES]
  assert not long, long


# A quoted mode name compared with ``==``/``!=`` or tested with ``in``/``not in`` a literal.
MODE = r"""["'](?:full|lora|poly|mhr|mhr_z|mhr_mu)["']"""
COMPARISON = re.compile(rf"(?:==|!=)\s*{MODE}|{MODE}\s*(?:==|!=)|\bin\s*[(\[{{][^)\]}}]*{MODE}")


@pytest.mark.parametrize("line,found", [
    ('if mode == "mhr":', True), ("x = mode in ('poly', 'mhr')", True),
    ('if "lora" != m:', True), ('cfg = AdapterConfig(mode="mhr")', False),
    ('modes.get_mode("mhr_z")', False)])
def test_mode_comparison_pattern(line, found):
  assert bool(COMPARISON.search(line)) == found


def test_mode_names_are_compared_only_in_the_modes_table():
  hits = []
  for path in _library_files():
    if path.name in MODE_NAMES_ALLOWED:
      continue
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if COMPARISON.search(line.split("#")[0]):
        hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
  assert not hits, hits
