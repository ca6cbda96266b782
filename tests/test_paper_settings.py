"""docs/paper_settings.md against the gin presets: every row of its table is checked.

Each preset named in a row is parsed through ``mhr_jax.train.parse_gin`` and its operative
configuration read: the config objects ``run`` receives (``gin.get_bindings("run")``, defaults
included), ``run``'s own arguments, and the gin-configurable task registrations. A row whose
binding is a Python expression (``tasks.p3.MAX_EXAMPLES_PER_DATASET``) is checked against the code.
A row marked "(needs trainer wiring)" names a knob the trainer does not have yet: the test checks
that it still does not exist, so wiring it fails here until the row and the preset are updated.
"""

import ast
import functools
import inspect
import math
import pathlib
import re

import gin
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GIN = REPO / "gin_configs"
TABLE = REPO / "docs" / "paper_settings.md"
WIRING = "(needs trainer wiring) "
# Placeholders for the required macros of the presets.
PLACEHOLDERS = {"MODEL_DIR": "/tmp/paper_settings", "INIT_FROM": "/tmp/paper_settings_parent",
                "T0_DATA_DIR": "/data/t0", "SUPER_NI_DIR": "/data/sni",
                "MIXTURE": "super_ni_task001_placeholder"}
RUN_CONFIGS = {"DataConfig": "data_config", "OptimizerConfig": "optimizer_config",
               "TrainConfig": "train_config", "AdapterConfig": "adapter_config",
               "ModelConfig": "model_config", "MeshConfig": "mesh_config"}


def _cell(text):
  return text.strip().strip("`")


def _rows():
  """The rows of the section "The table" as dicts keyed by its header (tables of other sections,
  such as the parameter counts, are not settings)."""
  section = TABLE.read_text().split("\n## The table\n", 1)[1].split("\n## ", 1)[0]
  lines = [l for l in section.splitlines() if l.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  out = []
  for line in lines[1:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(header), f"malformed table row: {line}"
    out.append(dict(zip(header, cells)))
  return out


ROWS = _rows()


def _presets(spec):
  """Gin file lists of a presets cell: ``a, b + method_x, t0_fewshot/*`` ('code': none)."""
  if spec == "code":
    return []
  combos = []
  for part in spec.split(", "):
    names = [n.strip() for n in part.split("+")]
    files = sorted(f for f in GIN.glob(f"experiments/{names[0]}.gin")
                   if not f.name.startswith("_"))
    assert files, f"no preset matches {names[0]!r}"
    overlays = [f"overlays/{n}.gin" for n in names[1:]]
    for o in overlays:
      assert (GIN / o).is_file(), o
    combos += [(str(f.relative_to(GIN)), *overlays) for f in files]
  return combos


def _value(text):
  return ast.literal_eval(_cell(text))


def _same(got, want):
  if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
    return math.isclose(got, want, rel_tol=1e-12)
  return type(got) is type(want) and got == want


@functools.lru_cache(maxsize=None)
def _operative(files):
  """{binding: value} reader of one preset combination, parsed once."""
  from mhr_jax import train

  # A binding given after the files overrides them: MIXTURE only where the preset leaves it open.
  fill = [f"{m}={v!r}" for m, v in PLACEHOLDERS.items() if m != "MIXTURE"]
  gin.clear_config()
  try:
    train.parse_gin(list(files), fill, [])
  except ValueError as e:
    if "MIXTURE" not in str(e):
      raise
    gin.clear_config()
    train.parse_gin(list(files), fill + [f"MIXTURE={PLACEHOLDERS['MIXTURE']!r}"], [])
  run_bindings = gin.get_bindings("run")
  train.main_entry(dry_run=True)  # the preset runs as far as --dry_run goes
  registrations = {name: gin.get_bindings(name) for name in ("register_t0", "register_super_ni")}
  gin.clear_config()
  return run_bindings, registrations


def _default(fn, param):
  return inspect.signature(inspect.unwrap(fn)).parameters[param].default


def _lookup(files, binding):
  from mhr_jax import trainer
  from tasks import super_ni, t0

  run_bindings, registrations = _operative(files)
  owner, param = binding.split(".", 1)
  if owner in RUN_CONFIGS:
    return getattr(run_bindings[RUN_CONFIGS[owner]], param)
  if owner == "run":
    return run_bindings.get(param, _default(trainer.run, param))
  fns = {"register_t0": t0.register_t0, "register_super_ni": super_ni.register_super_ni}
  return registrations[owner].get(param, _default(fns[owner], param))


@pytest.fixture(scope="module", autouse=True)
def _clean_gin():
  yield
  gin.clear_config()


def test_table_is_complete():
  assert len(ROWS) > 100
  named = {f for row in ROWS for combo in _presets(row["presets"]) for f in combo}
  presets = {str(p.relative_to(GIN)) for p in (GIN / "experiments").rglob("*.gin")
             if not p.name.startswith(("synthetic", "_"))}
  assert presets - named == set(), "presets without a row in docs/paper_settings.md"
  for area in ("t0_pretrain.gin", "t0_fewshot/rte.gin", "t0_zeroshot.gin", "super_ni_pretrain.gin",
               "super_ni_finetune.gin", "super_ni_zeroshot.gin"):
    assert f"experiments/{area}" in named


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['setting']} [{r['presets']}]" for r in ROWS])
def test_row_holds(row):
  binding, ours = _cell(row["binding"]), row["our value"]
  if ours.startswith(WIRING):
    from mhr_jax import trainer

    _value(ours[len(WIRING):])  # a well-formed value all the same
    owner, param = binding.split(".", 1)
    cls = getattr(trainer, owner)
    assert param not in inspect.signature(cls).parameters, (
        f"{binding} exists now: bind it in the presets and drop the wiring mark of its row")
    return
  want = _value(ours)
  if row["presets"] == "code":
    import tasks.p3  # noqa: F401
    import tasks.super_ni  # noqa: F401
    import tasks.t0  # noqa: F401

    assert re.fullmatch(r"[\w\.\[\]\"\(\)]+", binding), binding
    got = eval(binding, {"tasks": tasks, "len": len})  # noqa: S307  (the doc's own expressions)
    assert _same(got, want), f"{binding} = {got!r}, the table says {want!r}"
    return
  for files in _presets(row["presets"]):
    got = _lookup(files, binding)
    assert _same(got, want), f"{' + '.join(files)}: {binding} = {got!r}, the table says {want!r}"
