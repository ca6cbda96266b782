"""The benchmark's bookkeeping: shapes, FLOP formula, jobs, ratios from medians, tables, and the
quick run's output.

No timing is asserted anywhere: the figures depend on the machine and its load.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import derive, flops, jobs, plan, tables
from benchmarks.configs import SHAPES, StepConfig
from mhr_jax import network
REPO = pathlib.Path(__file__).resolve().parents[1]


def test_shapes_are_the_network_presets():
  for name in ("tiny", "small", "base"):
    preset = network.PRESETS[name]
    assert SHAPES[name] == {f: getattr(preset, f) for f in SHAPES[name]}, name
  assert SHAPES["small2"] == dict(SHAPES["small"], num_layers=2)


def test_step_flops_orders_methods_and_counts_frozen_backward_once():
  cfg = StepConfig(shape="small", method="none")
  none = flops.step_flops(cfg)
  lora = flops.step_flops(StepConfig(shape="small", method="lora"))
  mhr = flops.step_flops(StepConfig(shape="small", method="mhr", n_splits=8))
  assert none["step"] < lora["step"] < mhr["step"]
  # Frozen backbone: backward = forward + one more attention forward (no weight gradients).
  b, li, lt = cfg.batch, cfg.in_len, cfg.tgt_len
  attn = 4 * b * 6 * 64 * 8 * (li * li + lt * lt + lt * li)
  assert math.isclose(none["backward"], none["forward"] + attn)
  head = 2 * b * lt * 512 * 32128  # the output head alone, per pass
  assert none["forward"] > head
  # Adapters: backward counts them twice (activation and weight gradients).
  delta_f = lora["forward"] - none["forward"]
  assert math.isclose(lora["backward"] - none["backward"], 2 * delta_f)
  # One mixed adapter per layer when a single-task batch shares its routing weights.
  shared = flops.step_flops(StepConfig(shape="small", method="mhr", single_task=True,
                                       routing_noise=False))
  per_layer = sum(di + do for _, di, do in flops.adapted_layers(cfg))
  assert math.isclose(mhr["forward"] - shared["forward"], 2 * (8 - 1) * 8 * 8 * per_layer)


def test_step_config_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown shape 'huge'"):
    StepConfig(shape="huge")
  with pytest.raises(ValueError, match="unknown method 'prefix'"):
    StepConfig(method="prefix")


def test_jobs_are_data_and_every_kind_has_a_handler():
  p = plan.Plan(shapes=("small", "base"))
  job_list = plan.make_jobs(p, tuple(plan.MEASUREMENTS))
  assert {j["kind"] for j in job_list} <= set(jobs.KINDS)
  json.dumps(job_list)  # a job crosses the process boundary as JSON
  for j in job_list:
    for e in j.get("entries", [j] if "config" in j else []):
      StepConfig(**e["config"])  # every configuration is valid
  routing = [j for j in job_list if any(e["name"] == "routing_step" for e in j.get("entries", []))]
  assert len(routing) == 4  # per shape and rank
  labels = {(e["impl"], StepConfig(**e["config"]).label(), e["tags"]["batch"])
            for e in routing[0]["entries"]}
  assert ("ours", "mhr_k8_s64_r1", "finetune") in labels and ("peft", "none", "any") in labels
  assert len(labels) == 2 * (2 + 2 * 3)
  with pytest.raises(ValueError, match="unknown measurements"):
    plan.make_jobs(p, ("peak", "speed"))
  with pytest.raises(ValueError, match="unknown job kind"):
    jobs.run_job(dict(kind="nope", impl="ours"))


def _step(impl, label, median, rss=100.0, shape="small", name="step", **config):
  method = label.split("_")[0]
  return dict(name=name, impl=impl,
              config=dict(shape=shape, label=label, method=method, rank=8, **config),
              median_s=median, tokens_per_s=1280 / median, flops_per_s=1e9 / median,
              peak_rss_mb=rss)


def _records():
  records = [
      dict(name="peak_matmul", impl="ours", config={}, median_s=1.0, flops_per_s=4e9),
      dict(name="peak_matmul", impl="peft", config={}, median_s=1.0, flops_per_s=2e9),
      _step("ours", "none", 1.0, rss=300.0), _step("peft", "none", 2.0, rss=600.0),
      _step("ours", "lora_r8", 1.2), _step("peft", "lora_r8", 3.0),
      _step("ours", "mhr_k8_s8_r8", 1.5), _step("peft", "mhr_k8_s8_r8", 6.0),
      dict(name="finetune_loop", impl="ours", config=dict(shape="small2", n_jobs=8),
           median_s=8.0, tokens_per_s=1.0),
      dict(name="finetune_vmap", impl="ours", config=dict(shape="small2", n_jobs=8),
           median_s=2.0, tokens_per_s=4.0),
  ]
  for t, med, single in ((10, 1.0, False), (10, 0.5, True), (10000, 1.1, False)):
    records.append(dict(name="scaling", impl="ours", median_s=med, tokens_per_s=1 / med,
                        config=dict(shape="small2", label="mhr_k8_s8_r8", sweep="n_tasks",
                                    n_tasks=t, single_task=single)))
  records.append(dict(name="profile", impl="ours", median_s=1.0, step_s=1.0,
                      config=dict(shape="small", label="none"), matmul_flops=2e9,
                      matmul_flops_per_s=2e9, matmul_share=0.5,
                      categories={"matmul": 0.5, "elementwise": 0.3, "copy/transpose": 0.1,
                                  "gather/scatter": 0.0, "unattributed": 0.1}))
  for impl, med in (("ours", 2.0), ("peft", 3.0)):
    records.append(_step(impl, "mhr_k8_s8_r8", med, name="versus_step"))
  for impl, none, lora, mixed, single in (("ours", 1.0, 1.02, 1.2, 1.05),
                                         ("peft", 1.5, 1.75, 2.4, 2.1)):
    records.append(_step(impl, "none", none, name="routing_step", batch="any"))
    records.append(_step(impl, "lora_r8", lora, name="routing_step", batch="any"))
    records.append(_step(impl, "mhr_k8_s8_r8", mixed, name="routing_step", batch="pretrain"))
    records.append(_step(impl, "mhr_k8_s8_r8", single, name="routing_step", batch="finetune"))
  for r in records[-8:]:  # steps in turn also carry their CPU times
    r["median_cpu_s"] = r["median_s"] / 2 if r["config"]["batch"] == "finetune" else r["median_s"]
  return records


def test_derived_ratios_come_from_the_medians():
  records = _records()
  derived = derive.derive(records)
  by = {(r["name"], r["impl"], json.dumps(r["config"], sort_keys=True)): r for r in derived}

  def get(name, impl, **config):
    return by[(name, impl, json.dumps(config, sort_keys=True))]["ratio"]

  assert get("speedup_vs_peft", "ours/peft", shape="small", label="mhr_k8_s8_r8") == 4.0
  assert get("speedup_vs_peft", "ours/peft", shape="small", label="lora_r8") == 2.5
  assert get("memory_vs_peft", "ours/peft", shape="small", label="none") == 0.5
  assert get("routing_overhead", "ours", shape="small", label="mhr_k8_s8_r8",
             versus="lora_r8") == pytest.approx(1.5 / 1.2)
  assert get("routing_overhead", "peft", shape="small", label="mhr_k8_s8_r8", versus="none") == 3.0
  assert get("vmap_speedup", "ours", shape="small2", n_jobs=8) == 4.0
  assert get("speedup_vs_peft_side_by_side", "ours/peft", shape="small",
             label="mhr_k8_s8_r8") == 1.5
  assert get("mixed_vs_single_task", "ours", shape="small2", n_tasks=10) == 2.0
  routed = dict(shape="small", rank=8, label="mhr_k8_s8_r8")
  assert get("routed_over_none", "ours", **routed, batch="finetune") == pytest.approx(1.05)
  assert get("routed_over_none", "peft", **routed, batch="pretrain") == pytest.approx(1.6)
  assert get("routed_vs_peft", "ours/peft", **routed, batch="finetune") == pytest.approx(2.0)
  assert get("routed_over_lora", "ours", **routed, batch="finetune") == pytest.approx(1.05 / 1.02)
  assert get("routed_over_lora", "peft", **routed, batch="pretrain") == pytest.approx(2.4 / 1.75)
  assert get("routed_over_none", "ours", shape="small", rank=8, label="lora_r8",
             batch="any") == pytest.approx(1.02)
  assert not [r for r in derived if r["name"] == "routed_over_lora"
              and r["config"]["label"] == "lora_r8"]  # LoRA over itself: not a ratio
  cpu = by[("routed_over_none", "ours", json.dumps(dict(routed, batch="finetune"),
                                                   sort_keys=True))]["cpu_ratio"]
  assert cpu == pytest.approx(1.05 / 2)
  scaling = [r for r in records if r["name"] == "scaling" and not r["config"]["single_task"]]
  assert [r["ratio"] for r in scaling] == [1.0, pytest.approx(1.1)]
  ours_none = next(r for r in records if r["name"] == "step" and r["impl"] == "ours")
  assert ours_none["frac_of_peak"] == pytest.approx(1e9 / 4e9)
  profile = next(r for r in records if r["name"] == "profile")
  assert profile["matmul_frac_of_peak"] == pytest.approx(0.5)


def test_tables_hold_every_record():
  records = _records()
  derived = derive.derive(records)
  table = tables.markdown_table(records + derived)
  assert table.count("\n") == len(records + derived)  # + header - the profile record
  profiles = tables.profile_table(records)
  assert profiles.count("\n") == 2 and "| ours | small none | 1 | 0.5 (50%) | 2 | 0.5 |" in profiles
  routing = tables.routing_table(derived)
  assert ("| small | 8 | mhr_k8_s8_r8 | finetune | 1.05 (0.525) | 1.03 (0.515) | 1.4 (0.7) | "
          "1.2 (0.6) | 2 (2) |") in routing


@pytest.mark.slow
def test_quick_run_writes_json_lines_and_table(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert lines[0]["name"] == "machine" and lines[0]["config"]["cpu_flags"] is not None
  records = lines[1:]
  errors = [r for r in records if "error" in r]
  assert not errors, errors
  measured = [r for r in records if "median_s" in r and "ratio" not in r]
  for r in measured:
    assert {"name", "impl", "config", "device"} <= set(r)
  assert {r["device"].get("platform") for r in measured if r["impl"] == "ours"} == {"cpu"}
  steps = {(r["impl"], r["config"]["label"]): r for r in records if r["name"] == "step"}
  for r in steps.values():
    assert {"median_s", "tokens_per_s", "peak_rss_mb", "model_flops"} <= set(r)
    assert r["tokens_per_s"] == pytest.approx(r["config"]["batch"] * (
        r["config"]["in_len"] + r["config"]["tgt_len"]) / r["median_s"])
  assert {label for _, label in steps} == {"none", "lora_r8", "poly_k8_r8", "mhr_k8_s8_r8"}
  for r in records:
    if r["name"] == "speedup_vs_peft":
      ours = steps[("ours", r["config"]["label"])]
      peft = steps[("peft", r["config"]["label"])]
      assert r["ratio"] == pytest.approx(peft["median_s"] / ours["median_s"])
  names = {r["name"] for r in records}
  assert {"peak_matmul", "speedup_vs_peft", "routing_overhead", "memory_vs_peft", "scaling",
          "mixed_vs_single_task", "finetune_loop", "finetune_vmap", "vmap_speedup", "profile",
          "versus_step", "speedup_vs_peft_side_by_side", "routing_step", "routed_over_none",
          "routed_over_lora", "routed_vs_peft"} <= names
  for r in records:
    if r["name"] == "profile":
      assert set(r["categories"]) == {"matmul", "elementwise", "copy/transpose",
                                      "gather/scatter", "unattributed"}
      assert r["categories"]["matmul"] > 0 and r["matmul_flops"] > 0
  table = (tmp_path / "table.md").read_text()
  assert "| name | impl |" in table and "| shape | rank | adapters | batch |" in table
