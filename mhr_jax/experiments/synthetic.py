"""The embedded synthetic benchmark (``tasks/synthetic.py``) as a pipeline of stages.

It needs no download and no pretrained model. ``synthetic_stages`` states the stages as data:

  backbone              a tiny T5 trained in full on the primitive-skill tasks, then frozen (it
                        stands in for a pretrained checkpoint; shared by every seed of a study);
  pretrain_{lora,poly,mhr}
                        adapters pre-trained on the training compositions (task given only by id);
  finetune_<method>     few-shot adaptation to every held-out composition, one vmapped program per
                        method: LoRA from scratch (no multi-task pre-training), LoRA, Poly, MHR,
                        MHR-z, MHR-mu;
  zeroshot_mhr_mu       MHR-mu continued on the training mixture, held-out tasks with no data;
  pretrain_{lora,mhr}_described, described_zeroshot_{lora,mhr_mu}
                        the same on the described variant, whose inputs name their composition,
                        so that zero-shot transfer is possible at all: LoRA evaluated as
                        pre-trained, MHR-mu after its extra multi-task steps.

Each reported method reads its held-out split (``SyntheticSettings.eval_split``: ``test`` for
reported runs, ``validation`` for calibration) once, at the end of its stage.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Optional, Sequence

import gin
import numpy as np

from mhr_jax import trainer
from mhr_jax.experiments import pipeline
from tasks import synthetic as tasks_synthetic

# Table rows: method -> what it is.
METHODS = {
    "lora_scratch": "LoRA from scratch (no multi-task pre-training)",
    "lora": "LoRA",
    "poly": "Poly",
    "mhr": "MHR",
    "mhr_z": "MHR-z (routing only)",
    "mhr_mu": "MHR-mu (averaged skills, one LoRA)",
    "zeroshot_mhr_mu": "zero-shot MHR-mu, undescribed tasks (floor by construction)",
    "described_zeroshot_lora": "zero-shot LoRA, described tasks",
    "described_zeroshot_mhr_mu": "zero-shot MHR-mu, described tasks",
}
# The undescribed zero-shot MHR-mu cannot know which held-out composition to compute: left out
# of the default job, available by name.
DEFAULT_METHODS = tuple(m for m in METHODS if m != "zeroshot_mhr_mu")
ZERO_SHOT = ("zeroshot_mhr_mu", "described_zeroshot_lora", "described_zeroshot_mhr_mu")

gin.external_configurable(tasks_synthetic.SyntheticConfig, module="tasks")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
  """The benchmark's tasks, sizes, steps and learning rates.

  Attributes:
    task_config: the task generator (``tasks.synthetic.SyntheticConfig``); its ``seed`` decides
      the tasks and stays fixed across the seeds of a study.
    prefix: the registered task names' prefix; another ``task_config`` needs another prefix.
    inputs_length, targets_length: sequence lengths (EOS included) of the undescribed tasks.
    described_inputs_length: input length of the described variant (the description is longer).
    batch_size: rows per step of the backbone, pre-training and zero-shot stages.
    finetune_batch_size: rows per step and held-out task in few-shot fine-tuning.
    backbone_steps, backbone_learning_rate: the backbone's full training.
    pretrain_steps, pretrain_learning_rate: multi-task adapter pre-training.
    pretrain_snapshots: checkpoints kept over pre-training (gradient alignment and routing
      entropy over training are computed from them).
    finetune_steps, finetune_learning_rate: few-shot adaptation.
    zeroshot_steps: MHR-mu's extra multi-task steps (at the pre-training learning rate).
    n_skills, n_splits: K and MHR's S.
    lora_rank: r of every adapter.
    adapted_layers: ``AdapterConfig.layers``.
    relaxed_bernoulli: routing noise in pre-training and fine-tuning.
    routing_learning_rate: absolute learning rate of the routing logits.
    eval_split: the held-out split the methods are scored on: ``test`` for reported runs,
      ``validation`` for calibration (every choice of the settings is made on it).
  """

  task_config: tasks_synthetic.SyntheticConfig = tasks_synthetic.SyntheticConfig()
  prefix: str = "synthetic"
  inputs_length: int = 22
  targets_length: int = 8
  described_inputs_length: int = 36
  batch_size: int = 32
  finetune_batch_size: int = 16
  backbone_steps: int = 1500
  backbone_learning_rate: float = 1e-3
  pretrain_steps: int = 1000
  pretrain_learning_rate: float = 1.5e-2
  pretrain_snapshots: int = 5
  finetune_steps: int = 100
  finetune_learning_rate: float = 3e-3
  zeroshot_steps: int = 100
  n_skills: int = 8
  n_splits: int = 4
  lora_rank: int = 4
  adapted_layers: str = "t0"
  relaxed_bernoulli: bool = False
  routing_learning_rate: float = 0.1
  eval_split: str = "test"

  def __post_init__(self):
    if self.eval_split not in ("validation", "test"):
      raise ValueError(f"eval_split must be 'validation' or 'test', got {self.eval_split!r}")
    longest = self.task_config.longest()
    short = [f"{field} = {getattr(self, field)} < {longest[key]}" for field, key in (
        ("inputs_length", "inputs"), ("described_inputs_length", "described_inputs"),
        ("targets_length", "targets")) if getattr(self, field) < longest[key]]
    if short:
      raise ValueError(f"SyntheticSettings: {', '.join(short)}: the task configuration's longest "
                       "examples would be truncated (and scored wrong)")

  @property
  def described_prefix(self) -> str:
    return f"{self.prefix}_described"

  def register(self) -> None:
    """Registers the tasks of ``task_config`` and of its described variant (idempotent)."""
    tasks_synthetic.register_synthetic(self.task_config, prefix=self.prefix)
    described = dataclasses.replace(self.task_config, described=True)
    tasks_synthetic.register_synthetic(described, prefix=self.described_prefix)


def synthetic_stages(s: SyntheticSettings) -> tuple[pipeline.Stage, ...]:
  """Every stage of the benchmark, in dependency order."""
  plain = {"inputs": s.inputs_length, "targets": s.targets_length}
  described = {"inputs": s.described_inputs_length, "targets": s.targets_length}
  shapes = {"lora": (1, 1), "poly": (s.n_skills, 1), "mhr": (s.n_skills, s.n_splits),
            "mhr_z": (s.n_skills, s.n_splits), "mhr_mu": (s.n_skills, s.n_splits)}
  common = dict(backbone="backbone", batch_size=s.batch_size)

  def pretrain(name, mode, prefix, lengths):
    k, n = shapes[mode]
    return pipeline.Stage(
        f"pretrain_{name}", "pretrain", mode, f"{prefix}_pretrain", lengths, n_skills=k,
        n_splits=n, steps=s.pretrain_steps, learning_rate=s.pretrain_learning_rate,
        snapshots=s.pretrain_snapshots, **common)

  def finetune(method, mode, parent):
    k, n = shapes[mode]
    return pipeline.Stage(
        f"finetune_{method}", "finetune", mode, f"{s.prefix}_heldout", plain, n_skills=k,
        n_splits=n, steps=s.finetune_steps, learning_rate=s.finetune_learning_rate,
        batch_size=s.finetune_batch_size, parent=parent, backbone="backbone",
        eval_split=s.eval_split, vmap_tasks=True, method=method)

  def zeroshot(method, parent, prefix, lengths):
    k, n = shapes["mhr_mu"]
    return pipeline.Stage(
        method, "zeroshot", "mhr_mu", f"{prefix}_pretrain", lengths, n_skills=k, n_splits=n,
        steps=s.zeroshot_steps, learning_rate=s.pretrain_learning_rate, parent=parent,
        eval_tasks=(f"{prefix}_heldout",), eval_split=s.eval_split, method=method, **common)

  d = s.described_prefix
  return (
      pipeline.Stage("backbone", "pretrain", None, f"{s.prefix}_primitives", plain,
                     steps=s.backbone_steps, learning_rate=s.backbone_learning_rate,
                     batch_size=s.batch_size, eval_tasks=(f"{s.prefix}_primitives",),
                     shared=True),
      pretrain("lora", "lora", s.prefix, plain),
      pretrain("poly", "poly", s.prefix, plain),
      pretrain("mhr", "mhr", s.prefix, plain),
      finetune("lora_scratch", "lora", None),
      finetune("lora", "lora", "pretrain_lora"),
      finetune("poly", "poly", "pretrain_poly"),
      finetune("mhr", "mhr", "pretrain_mhr"),
      finetune("mhr_z", "mhr_z", "pretrain_mhr"),
      finetune("mhr_mu", "mhr_mu", "pretrain_mhr"),
      zeroshot("zeroshot_mhr_mu", "pretrain_mhr", s.prefix, plain),
      pretrain("lora_described", "lora", d, described),
      pretrain("mhr_described", "mhr", d, described),
      pipeline.Stage("described_zeroshot_lora", "eval", "lora", f"{d}_pretrain", described,
                     evaluates="pretrain_lora_described", eval_tasks=(f"{d}_heldout",),
                     eval_split=s.eval_split, method="described_zeroshot_lora", **common),
      zeroshot("described_zeroshot_mhr_mu", "pretrain_mhr_described", d, described),
  )


def method_stages(stages: Sequence[pipeline.Stage], methods: Sequence[str]) -> list[str]:
  """The stage names that report ``methods`` (the backbone always runs)."""
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
  return ["backbone"] + [st.name for st in stages if st.method in methods]


def method_row(method: str, results: dict) -> dict:
  """One table row from a stage's results: mean and spread over held-out tasks, parameters."""
  scores = {t: float(m["exact_match"]) for t, m in results["eval"].items()}
  values = list(scores.values())
  trained = int(results["parameters"]["trainable"])
  return {"exact_match": float(np.mean(values)), "std": float(np.std(values)),
          "per_task": scores, "zero_shot": method in ZERO_SHOT,
          "trainable": 0 if method in ZERO_SHOT else trained, "trained_shared": trained}


def make_table(stages: Sequence[pipeline.Stage], results: dict[str, dict], seconds: float,
               split: str, cpu_seconds: float = float("nan")) -> dict:
  """``{"methods": {method: row}, "backbone_primitives": mean exact match, ...}``.

  ``seconds`` is the invocation's wall time, ``cpu_seconds`` the CPU time of its process (on a
  shared machine the wall time grows with the load, the CPU time much less).
  """
  rows = {st.method: method_row(st.method, results[st.name])
          for st in stages if st.method and st.name in results}
  backbone = results["backbone"].get("eval", {})
  primitives = float(np.mean([m["exact_match"] for m in backbone.values()])) if backbone else None
  return {"methods": rows, "backbone_primitives": primitives, "split": split, "seconds": seconds,
          "cpu_seconds": cpu_seconds}


def format_table(table: dict) -> str:
  """The table as Markdown."""
  lines = [f"| method | held-out exact match (%, {table['split']}) | std over tasks | "
           "trainable parameters per task |", "|---|---|---|---|"]
  for method, row in table["methods"].items():
    trainable = (f"0 (shared adapter: {row['trained_shared']:,})" if row["zero_shot"]
                 else f"{row['trainable']:,}")
    lines.append(f"| {METHODS[method]} | {row['exact_match']:.1f} | {row['std']:.1f} | "
                 f"{trainable} |")
  if table["backbone_primitives"] is not None:
    lines.append(f"\nBackbone on the primitive skills (validation exact match, mean over skills): "
                 f"{table['backbone_primitives']:.1f}%.")
  lines.append(f"\n(this invocation: {table['seconds']:.0f} s wall time, "
               f"{table['cpu_seconds']:.0f} s CPU time)")
  return "\n".join(lines)


@gin.configurable
def synthetic_benchmark(
    *,
    dry_run: bool = False,
    settings: SyntheticSettings = SyntheticSettings(),
    model_config: trainer.ModelConfig = trainer.ModelConfig(),
    workdir: str = "runs/synthetic",
    shared_dir: Optional[str] = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    seed: int = 0,
) -> dict:
  """Runs the benchmark end to end and prints its table; stages already finished are reused.

  Args:
    dry_run: check the configuration and stop.
    settings: tasks, sizes, steps, learning rates and the evaluated split.
    model_config: the backbone's shape.
    workdir: one folder per stage, ``table.md`` and ``table.json``.
    shared_dir: where the backbone goes (default ``workdir``); a study shares it between seeds.
    methods: the table's rows (``METHODS``); only the stages they need run.
    seed: seeds every stage but the shared backbone (initialisation, data order, routing noise).

  Returns:
    The table (``make_table``).
  """
  stages = synthetic_stages(settings)
  targets = method_stages(stages, methods)
  if dry_run:
    return {}
  settings.register()
  t0, cpu0 = time.perf_counter(), time.process_time()
  work = pathlib.Path(workdir)
  ctx = pipeline.Context(
      workdir=work, shared_dir=pathlib.Path(shared_dir or workdir), seed=seed,
      model_config=model_config, lora_rank=settings.lora_rank,
      adapted_layers=settings.adapted_layers, relaxed_bernoulli=settings.relaxed_bernoulli,
      routing_learning_rate=settings.routing_learning_rate)
  results = pipeline.run_pipeline(stages, targets, ctx)
  table = make_table(stages, results, time.perf_counter() - t0, settings.eval_split,
                     time.process_time() - cpu0)
  table["stage_seconds"] = pipeline.stage_seconds(stages, list(results), ctx)
  text = format_table(table)
  print(text, flush=True)
  work.mkdir(parents=True, exist_ok=True)
  (work / "table.md").write_text(text + "\n")
  (work / "table.json").write_text(json.dumps(table, indent=1))
  return table
