"""Pipelines of runs described as data: stages, the stages they start from, their run configs.

A ``Stage`` names one ``trainer.run``: its kind and adapter mode, the stage whose checkpoint it
starts from (``parent``), the stage whose ``full`` run is its frozen backbone, its data and its
loop. ``run_pipeline`` runs the stages that the requested ones need, parents first, each in its
own directory, and reuses a stage whose results file exists (delete its folder to redo it).
Every stage directory gets a ``stage.json`` with the stage as run (mixture, lengths, steps,
seed), which ``mhr_jax.analysis`` reads.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Mapping, Optional, Sequence

from mhr_jax import adapters, modes, optimizers, trainer


@dataclasses.dataclass(frozen=True)
class Stage:
  """One run of a pipeline.

  Attributes:
    name: the stage's directory name, unique in its pipeline.
    kind: the run kind (``modes.RUN_KINDS``).
    mode: adapter mode; None trains the whole backbone (``full``).
    mixture: the seqio task or mixture trained on (for ``eval``: the run's own mixture).
    feature_lengths: ``{"inputs": Li, "targets": Lt}``.
    steps: optimizer steps.
    learning_rate: peak learning rate of the adapters (of the whole model in ``full`` mode).
    batch_size: rows per step (per task with ``vmap_tasks``).
    n_skills: K (1 for LoRA).
    n_splits: S (1 for LoRA and Poly).
    parent: the stage whose final checkpoint this one starts from (``TrainConfig.init_from``).
    backbone: the ``full`` stage whose final parameters are the frozen backbone.
    eval_tasks: tasks or mixtures evaluated at the end.
    eval_split: the split they are evaluated on.
    vmap_tasks: one copy of the trainable state per task of ``mixture``, in one program.
    snapshots: checkpoints spread over training and all kept (> 1 for analysis over training).
    evaluates: for ``kind="eval"``: the stage whose directory and checkpoint are evaluated; its
      results go to ``results_eval.json`` there.
    shared: the stage lives in the pipeline's shared directory (the same for every seed) and
      runs with ``shared_seed``.
    method: the table row this stage's evaluation reports, if any.
  """

  name: str
  kind: str
  mode: Optional[str]
  mixture: str
  feature_lengths: Mapping[str, int]
  steps: int = 0
  learning_rate: float = 1e-3
  batch_size: int = 32
  n_skills: int = 1
  n_splits: int = 1
  parent: Optional[str] = None
  backbone: Optional[str] = None
  eval_tasks: tuple[str, ...] = ()
  eval_split: str = "validation"
  vmap_tasks: bool = False
  snapshots: int = 1
  evaluates: Optional[str] = None
  shared: bool = False
  method: Optional[str] = None

  def __post_init__(self):
    if self.kind not in modes.RUN_KINDS:
      raise ValueError(f"stage {self.name!r}: kind must be one of {list(modes.RUN_KINDS)}, "
                       f"got {self.kind!r}")
    if (self.kind == "eval") != (self.evaluates is not None):
      raise ValueError(f"stage {self.name!r}: an 'eval' stage names the stage it evaluates "
                       "(evaluates=...), and only an 'eval' stage does")
    if self.snapshots < 1:
      raise ValueError(f"stage {self.name!r}: snapshots must be >= 1, got {self.snapshots}")

  @property
  def needs(self) -> tuple[str, ...]:
    """The stages that must have finished before this one runs."""
    return tuple(n for n in (self.backbone, self.parent, self.evaluates) if n)


@dataclasses.dataclass(frozen=True)
class Context:
  """What every stage of one pipeline run shares.

  Attributes:
    workdir: where per-seed stages go (``<workdir>/<stage>``).
    shared_dir: where ``shared`` stages go (the backbone, trained once for every seed).
    seed: seeds the per-seed stages (initialisation, data order, routing noise).
    shared_seed: seeds the shared stages.
    model_config: the backbone's shape (``backbone_run`` is filled in per stage).
    lora_rank: r of every adapter.
    adapted_layers: ``AdapterConfig.layers``.
    relaxed_bernoulli: routing noise in training.
    routing_learning_rate: absolute learning rate of the routing logits.
  """

  workdir: pathlib.Path
  shared_dir: pathlib.Path
  seed: int = 0
  shared_seed: int = 0
  model_config: trainer.ModelConfig = trainer.ModelConfig()
  lora_rank: int = 4
  adapted_layers: str = "t0"
  relaxed_bernoulli: bool = False
  routing_learning_rate: float = 0.1


def check_graph(stages: Sequence[Stage]) -> dict[str, Stage]:
  """The stages by name; raises ``ValueError`` naming duplicate or unknown stage references."""
  by_name: dict[str, Stage] = {}
  for stage in stages:
    if stage.name in by_name:
      raise ValueError(f"two stages are named {stage.name!r}")
    by_name[stage.name] = stage
  for stage in stages:
    unknown = [n for n in stage.needs if n not in by_name]
    if unknown:
      raise ValueError(f"stage {stage.name!r} needs unknown stages {unknown}; "
                       f"known: {sorted(by_name)}")
  return by_name


def required(stages: Sequence[Stage], targets: Sequence[str]) -> list[Stage]:
  """The stages ``targets`` need, each after the stages it needs (in ``stages`` order)."""
  by_name = check_graph(stages)
  unknown = [t for t in targets if t not in by_name]
  if unknown:
    raise ValueError(f"unknown stages {unknown}; known: {sorted(by_name)}")
  needed, todo = set(), list(targets)
  while todo:
    name = todo.pop()
    if name not in needed:
      needed.add(name)
      todo.extend(by_name[name].needs)
  order: list[Stage] = []
  while len(order) < len(needed):
    ready = [s for s in stages if s.name in needed and s not in order
             and all(by_name[n] in order for n in s.needs)]
    if not ready:
      raise ValueError(f"stages {sorted(needed - {s.name for s in order})} need each other")
    order.append(ready[0])
  return order


def stage_dir(stage: Stage, stages: Mapping[str, Stage], ctx: Context) -> pathlib.Path:
  """The model directory of ``stage`` (for an ``eval`` stage: that of the stage it evaluates)."""
  if stage.evaluates:
    return stage_dir(stages[stage.evaluates], stages, ctx)
  return (ctx.shared_dir if stage.shared else ctx.workdir) / stage.name


def results_path(stage: Stage, stages: Mapping[str, Stage], ctx: Context) -> pathlib.Path:
  name = "results_eval.json" if stage.kind == "eval" else "results.json"
  return stage_dir(stage, stages, ctx) / name


def run_kwargs(stage: Stage, stages: Mapping[str, Stage], ctx: Context) -> dict:
  """The arguments of ``trainer.run`` for ``stage``."""
  model_config = ctx.model_config
  if stage.backbone:
    backbone = str(stage_dir(stages[stage.backbone], stages, ctx))
    model_config = dataclasses.replace(model_config, backbone_run=backbone)
  adapter = None
  if stage.mode is not None:
    adapter = adapters.AdapterConfig(
        mode=stage.mode, n_skills=stage.n_skills, n_splits=stage.n_splits,
        lora_rank=ctx.lora_rank, layers=ctx.adapted_layers,
        relaxed_bernoulli=ctx.relaxed_bernoulli)
  steps = max(stage.steps, 1)
  every = max(steps // stage.snapshots, 1)
  # An evaluation opens the evaluated run's checkpoints: keep as many as that run keeps.
  keep = (stages[stage.evaluates] if stage.evaluates else stage).snapshots + 1
  parent = str(stage_dir(stages[stage.parent], stages, ctx)) if stage.parent else None
  return dict(
      kind=stage.kind, model_dir=str(stage_dir(stage, stages, ctx)), model_config=model_config,
      adapter_config=adapter,
      optimizer_config=optimizers.OptimizerConfig(
          name="adamw", learning_rate=stage.learning_rate, weight_decay=0.0,
          routing_learning_rate=ctx.routing_learning_rate),
      data_config=trainer.DataConfig(
          mixture=stage.mixture, eval_tasks=stage.eval_tasks, feature_lengths=stage.feature_lengths,
          batch_size=stage.batch_size, eval_split=stage.eval_split),
      train_config=trainer.TrainConfig(
          steps=stage.steps, checkpoint_every=every, keep_checkpoints=keep,
          log_every=max(steps // 20, 1), seed=ctx.shared_seed if stage.shared else ctx.seed,
          vmap_tasks=stage.vmap_tasks, init_from=parent))


def describe_stage(stage: Stage, stages: Mapping[str, Stage], ctx: Context) -> dict:
  """``stage.json``: the stage as run, with the directories it read."""
  out = dataclasses.asdict(stage)
  out["feature_lengths"] = dict(stage.feature_lengths)
  out["seed"] = ctx.shared_seed if stage.shared else ctx.seed
  out["needs"] = {n: str(stage_dir(stages[n], stages, ctx)) for n in stage.needs}
  return out


def run_stage(stage: Stage, stages: Mapping[str, Stage], ctx: Context) -> dict:
  """Runs ``stage`` unless its results file exists; returns its results.

  ``stage.json`` records the stage and, once it has run, its wall and CPU seconds.
  """
  out = results_path(stage, stages, ctx)
  if out.exists():
    return json.loads(out.read_text())
  print(f"== {stage.name}", flush=True)
  kwargs = run_kwargs(stage, stages, ctx)
  directory = pathlib.Path(kwargs["model_dir"])
  directory.mkdir(parents=True, exist_ok=True)
  record = directory / ("stage_eval.json" if stage.kind == "eval" else "stage.json")
  described = describe_stage(stage, stages, ctx)
  record.write_text(json.dumps(described, indent=1))
  t0, cpu0 = time.perf_counter(), time.process_time()
  results = trainer.run(**kwargs)
  described.update(wall_seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0)
  record.write_text(json.dumps(described, indent=1))
  return results


def stage_seconds(stages: Sequence[Stage], names: Sequence[str], ctx: Context) -> dict:
  """``{stage: {"wall_seconds": .., "cpu_seconds": ..}}`` of the named stages that have run."""
  by_name = check_graph(stages)
  out = {}
  for name in names:
    stage = by_name[name]
    path = stage_dir(stage, by_name, ctx) / ("stage_eval.json" if stage.kind == "eval"
                                               else "stage.json")
    record = json.loads(path.read_text()) if path.exists() else {}
    if "wall_seconds" in record:
      out[name] = {k: record[k] for k in ("wall_seconds", "cpu_seconds")}
  return out


def run_pipeline(stages: Sequence[Stage], targets: Sequence[str], ctx: Context) -> dict[str, dict]:
  """Runs what ``targets`` need (finished stages are reused); returns ``{stage: results}``."""
  by_name = check_graph(stages)
  return {stage.name: run_stage(stage, by_name, ctx) for stage in required(stages, targets)}
