"""The README's set-up commands and CI stay in step (CI runs them in the order a user does)."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
  text = (REPO / "README.md").read_text()
  block = text.split("```bash\n", 1)[1].split("```", 1)[0]
  return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_commands_in_order():
  job, tests = _readme_commands()[:2]
  ci = (REPO / ".ci" / "run").read_text()
  assert tests in ci, "CI must run exactly the README's test command"
  train = job.split(" && ")[-1].replace(".venv/bin/python -m", "").strip()
  assert train.startswith("mhr_jax.train --gin_file=gin_configs/experiments/synthetic.gin")
  job_at = ci.index("-m " + train)
  assert job_at < ci.index(tests) < ci.index("--gin_file=runs/pretrain.gin", job_at)
