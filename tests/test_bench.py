"""The benchmark's bookkeeping: FLOP formula, ratios from medians, the quick run's output.

No timing is asserted anywhere: the figures depend on the machine and its load.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from mhr_jax import bench

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_step_flops_orders_methods_and_counts_frozen_backward_once():
  cfg = bench.StepConfig(shape="small", method="none")
  none = bench.step_flops(cfg)
  lora = bench.step_flops(bench.StepConfig(shape="small", method="lora"))
  mhr = bench.step_flops(bench.StepConfig(shape="small", method="mhr", n_splits=8))
  assert none["step"] < lora["step"] < mhr["step"]
  # Frozen backbone: backward = forward + one more attention forward (no weight gradients).
  b, li, lt = cfg.batch, cfg.in_len, cfg.tgt_len
  attn = 4 * b * 6 * 64 * 8 * (li * li + lt * lt + lt * li)
  assert math.isclose(none["backward"], none["forward"] + attn)
  # The output head alone: 2 * B * Lt * d_model * vocab per pass.
  head = 2 * b * lt * 512 * 32128
  assert none["forward"] > head
  # Adapters: backward counts them twice (activation and weight gradients).
  delta_f = lora["forward"] - none["forward"]
  assert math.isclose(lora["backward"] - none["backward"], 2 * delta_f)


def _step(impl, label, median, rss=100.0, shape="small"):
  method = label.split("_")[0]
  return dict(name="step", impl=impl, config=dict(shape=shape, label=label, method=method),
              median_s=median, tokens_per_s=1280 / median, flops_per_s=1e9 / median,
              peak_rss_mb=rss)


def test_derived_ratios_come_from_the_medians():
  records = [
      dict(name="peak_matmul", impl="ours", config={}, median_s=1.0, flops_per_s=4e9),
      dict(name="peak_matmul", impl="peft", config={}, median_s=1.0, flops_per_s=2e9),
      _step("ours", "none", 1.0, rss=300.0), _step("peft", "none", 2.0, rss=600.0),
      _step("ours", "lora", 1.2), _step("peft", "lora", 3.0),
      _step("ours", "mhr_k8_s8", 1.5), _step("peft", "mhr_k8_s8", 6.0),
      dict(name="finetune_loop", impl="ours", config=dict(shape="small2", n_jobs=8),
           median_s=8.0, tokens_per_s=1.0),
      dict(name="finetune_vmap", impl="ours", config=dict(shape="small2", n_jobs=8),
           median_s=2.0, tokens_per_s=4.0),
  ]
  for t, med, single in ((10, 1.0, False), (10, 0.5, True), (10000, 1.1, False)):
    records.append(dict(name="scaling", impl="ours", median_s=med, tokens_per_s=1 / med,
                        config=dict(shape="small2", label="mhr_k8_s8", sweep="n_tasks",
                                    n_tasks=t, single_task=single)))
  records.append(dict(name="profile", impl="ours", median_s=1.0, step_s=1.0,
                      config=dict(shape="small", label="none"), matmul_flops=2e9,
                      matmul_flops_per_s=2e9, matmul_share=0.5,
                      categories={"matmul": 0.5, "elementwise": 0.3, "copy/transpose": 0.1,
                                  "gather/scatter": 0.0, "unattributed": 0.1}))
  for impl, med in (("ours", 2.0), ("peft", 3.0)):
    records.append(dict(_step(impl, "mhr_k8_s8", med), name="versus_step"))
  derived = bench.derive(records)
  by = {(r["name"], r["impl"], json.dumps(r["config"], sort_keys=True)): r for r in derived}

  def get(name, impl, **config):
    return by[(name, impl, json.dumps(config, sort_keys=True))]

  assert get("speedup_vs_peft", "ours/peft", shape="small", label="mhr_k8_s8")["ratio"] == 4.0
  assert get("speedup_vs_peft", "ours/peft", shape="small", label="lora")["ratio"] == 2.5
  assert get("memory_vs_peft", "ours/peft", shape="small", label="none")["ratio"] == 0.5
  over = get("routing_overhead", "ours", shape="small", label="mhr_k8_s8", versus="lora")
  assert over["ratio"] == pytest.approx(1.5 / 1.2)
  assert get("routing_overhead", "peft", shape="small", label="mhr_k8_s8",
             versus="none")["ratio"] == 3.0
  assert get("vmap_speedup", "ours", shape="small2", n_jobs=8)["ratio"] == 4.0
  assert get("speedup_vs_peft_side_by_side", "ours/peft", shape="small",
             label="mhr_k8_s8")["ratio"] == 1.5
  assert get("mixed_vs_single_task", "ours", shape="small2", n_tasks=10)["ratio"] == 2.0
  scaling = [r for r in records if r["name"] == "scaling" and not r["config"]["single_task"]]
  assert [r["ratio"] for r in scaling] == [1.0, pytest.approx(1.1)]
  ours_none = next(r for r in records if r["name"] == "step" and r["impl"] == "ours")
  assert ours_none["frac_of_peak"] == pytest.approx(1e9 / 4e9)
  profile = next(r for r in records if r["name"] == "profile")
  assert profile["matmul_frac_of_peak"] == pytest.approx(0.5)
  table = bench.markdown_table(records + derived)
  assert table.count("\n") == len(records + derived)  # + header - the profile record
  profiles = bench.profile_table(records)
  assert profiles.count("\n") == 2 and "| ours | small none | 1 | 0.5 (50%) | 2 | 0.5 |" in profiles


@pytest.mark.slow
def test_quick_run_writes_json_lines_and_table(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, "-m", "mhr_jax.bench", "--quick", "--out", str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert lines[0]["name"] == "machine"
  records = lines[1:]
  errors = [r for r in records if "error" in r]
  assert not errors, errors
  for r in records:
    assert {"name", "impl", "config"} <= set(r)
  steps = {(r["impl"], r["config"]["label"]): r for r in records if r["name"] == "step"}
  for r in steps.values():
    assert {"median_s", "tokens_per_s", "peak_rss_mb", "model_flops"} <= set(r)
    assert r["tokens_per_s"] == pytest.approx(r["config"]["batch"] * (
        r["config"]["in_len"] + r["config"]["tgt_len"]) / r["median_s"])
  assert {label for _, label in steps} == {"none", "lora", "poly_k8", "mhr_k8_s8"}
  for r in records:
    if r["name"] == "speedup_vs_peft":
      ours = steps[("ours", r["config"]["label"])]
      peft = steps[("peft", r["config"]["label"])]
      assert r["ratio"] == pytest.approx(peft["median_s"] / ours["median_s"])
  names = {r["name"] for r in records}
  assert {"peak_matmul", "speedup_vs_peft", "routing_overhead", "memory_vs_peft", "scaling",
          "mixed_vs_single_task", "finetune_loop", "finetune_vmap", "vmap_speedup", "profile", "versus_step",
          "speedup_vs_peft_side_by_side"} <= names
  for r in records:
    if r["name"] == "profile":
      assert set(r["categories"]) == {"matmul", "elementwise", "copy/transpose",
                                      "gather/scatter", "unattributed"}
      assert r["categories"]["matmul"] > 0 and r["matmul_flops"] > 0
  assert "| name | impl |" in (tmp_path / "table.md").read_text()
