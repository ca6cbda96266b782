"""The one gin-configured ``run``: pre-train, fine-tune, evaluate, continue zero-shot MHR-mu.

A run is four named stages, called in order by ``run`` (the first in ``run_state``):

  build_state : the task tables (from the mixture; a parent run's table extended with the new
                tasks), the model of the run's mode (backbone, adapters, a parent run's checkpoint
                and the mode's transition from it, see ``modes``), its split into (graphdef,
                trainable, frozen), the optimizer and the step, sharded over the mesh and jitted.
                The frozen part gets no gradient, no optimizer state, and is never checkpointed.
  restore     : this run's latest checkpoint, if any (trainable, optimizer, step, data position).
  train_loop  : step, stop on a non-finite loss (the last good checkpoint stays), log, save,
                evaluate.
  finish      : final evaluation and ``results.json``.

Several held-out tasks can be fine-tuned in one program (``TrainConfig.vmap_tasks``): each task
gets its own copy of the trainable state, stacked on a leading axis, over the shared frozen
backbone, and the step is ``jax.vmap``-ed over that axis (``steps.jit_vmapped_train_step``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from typing import Optional, Sequence

import gin
import jax
import numpy as np
from etils import epath
from flax import nnx

from mhr_jax import (adapters, checkpoints, data, errors, evaluation, hf_import, length_buckets,
                     modes, network, optimizers, paths, reporting, sharding, steps)
from mhr_jax.run_state import RunState, build_state

import tasks.mixtures  # noqa: E402,F401  (registers the task collections)
from tasks import t0  # noqa: E402

log = logging.getLogger("mhr_jax.trainer")


# ----------------------------------------------------------------------------------------------
# Configuration (gin configures these and ``run``; nothing deeper).


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The backbone.

  Attributes:
    size: a preset of ``network.PRESETS`` (ignored when a checkpoint is set).
    overrides: T5Config fields to override (e.g. ``vocab_size``, ``dtype``, ``dropout_rate``).
    hf_checkpoint: a Hugging Face T5 directory to load the backbone from.
    t5x_checkpoint: a T5X checkpoint (a ``checkpoint_<step>`` folder or its ``checkpoint`` file;
      msgpack, tensorstore or orbax layout) to load the backbone from; its config is derived from
      the arrays (``interop.t5x.config_from_shapes``).
    backbone_run: a model directory of a ``full``-mode run whose final parameters are the backbone.
  """

  size: str = "tiny"
  overrides: dict = dataclasses.field(default_factory=dict)
  hf_checkpoint: Optional[str] = None
  t5x_checkpoint: Optional[str] = None
  backbone_run: Optional[str] = None

  def __post_init__(self):
    if self.hf_checkpoint and self.t5x_checkpoint:
      raise errors.ConfigError("ModelConfig: set hf_checkpoint or t5x_checkpoint, not both "
                               f"({self.hf_checkpoint!r}, {self.t5x_checkpoint!r})")

  @property
  def backbone(self) -> Optional[str]:
    """Where the backbone's weights come from (None: freshly initialized)."""
    return self.hf_checkpoint or self.t5x_checkpoint or self.backbone_run

  def t5_config(self) -> network.T5Config:
    """The backbone's T5 config: the checkpoint's or the preset's, overridden."""
    if self.hf_checkpoint:
      return hf_import.config_from_hf(hf_import.read_config(self.hf_checkpoint), **self.overrides)
    if self.t5x_checkpoint:
      from mhr_jax.interop import t5x

      return t5x.config_from_checkpoint(t5x.T5XCheckpoint(self.t5x_checkpoint), **self.overrides)
    return network.preset(self.size, **self.overrides)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train and evaluate on.

  Attributes:
    mixture: the seqio task or mixture trained on.
    eval_tasks: seqio tasks or mixtures evaluated (each of their tasks separately).
    feature_lengths: ``{"inputs": Li, "targets": Lt}``.
    batch_size: global batch size (split evenly over hosts).
    eval_split: split evaluated during and after training.
    eval_batch_size: rows per evaluation batch.
    max_eval_examples: cap per task (None: the whole split).
    eval_num_beams: beam size of generation in evaluation (1: greedy; 4 in the Super-NI setting).
    length_buckets: padded lengths a batch may be cut to, per feature, e.g.
      ``{"inputs": (64, 128), "targets": (16,)}``: each training and evaluation batch takes the
      smallest bucket that holds its longest sequence (the feature length when none does), so
      short batches cost less and compile once per bucket. Empty: always the feature lengths.
    t0_data_dir: registers the T0 held-out tasks from this folder (``tasks.t0.register_t0``).
    super_ni_dir: registers Super-NaturalInstructions from this folder
      (``tasks.super_ni.register_super_ni``).
    p3_data_dir: registers the T0 training mixture ``p3_t0_train`` from this P3 folder
      (``tasks.p3.register_p3``); ``$MHR_P3_DIR`` does the same when ``tasks.mixtures`` is
      imported (both naming different folders is an error).
    data_shards: shards the training data is split into (None: one per process). The global
      batches depend on it, not on the number of processes (``data.HostBatches``).
  """

  mixture: str = gin.REQUIRED
  eval_tasks: Sequence[str] = ()
  feature_lengths: dict = dataclasses.field(
      default_factory=lambda: {"inputs": 32, "targets": 32})
  batch_size: int = 32
  eval_split: str = "validation"
  eval_batch_size: int = 64
  max_eval_examples: Optional[int] = None
  eval_num_beams: int = 1
  length_buckets: dict = dataclasses.field(default_factory=dict)
  t0_data_dir: Optional[str] = None
  super_ni_dir: Optional[str] = None
  p3_data_dir: Optional[str] = None
  data_shards: Optional[int] = None

  def __post_init__(self):
    length_buckets.check(self.length_buckets, self.feature_lengths)

  def register(self) -> None:
    """Registers the collections that read local files (idempotent)."""
    if self.t0_data_dir:
      t0.register_t0(self.t0_data_dir)
    if self.super_ni_dir:
      from tasks import super_ni

      super_ni.register_super_ni(self.super_ni_dir)
    if self.p3_data_dir:
      from tasks import p3

      p3.register_p3(self.p3_data_dir)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop.

  Attributes:
    steps: optimizer steps of this run.
    checkpoint_every: steps between checkpoints (a final one is always written).
    eval_every: steps between evaluations (0: only at the end).
    log_every: steps between logged training metrics.
    keep_checkpoints: checkpoints kept on disk.
    seed: seeds initialisation, data order, dropout and routing noise.
    label_smoothing: of the token loss ("lm" only).
    loss_normalization: "tokens" or "batch" (see ``models.cross_entropy_loss``; "lm" only).
    loss: "lm", the token cross-entropy of the targets, or "tfew", the T-Few losses of
      multiple-choice fine-tuning (``models.tfew_loss_fn``: LM on the gold choice +
      ``mc_loss`` x length-normalised choice loss + ``unlikely_loss`` x unlikelihood of the
      wrong choices), trained on ``choices.MultipleChoiceIterator`` batches of a mixture whose
      examples carry ``answer_choices`` and ``label`` (the T0 tasks).
    mc_loss, length_norm, unlikely_loss: the T-Few weights, named as in the authors'
      ``t0/<dataset>.json`` (all 1 there); read with ``loss="tfew"`` only.
    vmap_tasks: fine-tune each task of the mixture in its own copy, in one vmapped program.
    init_from: the model directory of the run this one starts from (fine-tuning, zero-shot, and
      evaluating a run that started from one); ``modes`` says which modes may start from which.
  """

  steps: int = 1000
  checkpoint_every: int = 500
  eval_every: int = 0
  log_every: int = 50
  keep_checkpoints: int = 2
  seed: int = 0
  label_smoothing: float = 0.0
  loss_normalization: str = "tokens"
  vmap_tasks: bool = False
  init_from: Optional[str] = None
  loss: str = "lm"
  mc_loss: float = 1.0
  length_norm: float = 1.0
  unlikely_loss: float = 1.0

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise errors.ConfigError(f"TrainConfig.loss={self.loss!r}: choose one of {LOSSES}")
    if self.loss == "tfew" and self.label_smoothing:
      raise errors.ConfigError(
          f"TrainConfig.label_smoothing={self.label_smoothing} applies to the LM loss only; the "
          "T-Few losses (loss='tfew') are unsmoothed")


LOSSES = ("lm", "tfew")


gin.external_configurable(adapters.AdapterConfig, module="mhr_jax")
gin.external_configurable(optimizers.OptimizerConfig, module="mhr_jax")
gin.external_configurable(sharding.MeshConfig, module="mhr_jax")


# ----------------------------------------------------------------------------------------------
# The run.


@gin.configurable
def run(
    *,
    kind: str = "pretrain",
    model_dir: str = gin.REQUIRED,
    model_config: ModelConfig = ModelConfig(),
    adapter_config: Optional[adapters.AdapterConfig] = None,
    optimizer_config: optimizers.OptimizerConfig = optimizers.OptimizerConfig(),
    data_config: DataConfig = gin.REQUIRED,
    train_config: TrainConfig = TrainConfig(),
    mesh_config: sharding.MeshConfig = sharding.MeshConfig(),
    sharding_strategy: str = "dp",
    dry_run: bool = False,
) -> dict:
  """One run; returns its results (also written to ``<model_dir>/results.json``).

  Args:
    kind: a run kind of ``modes.RUN_KINDS``: "pretrain", "finetune", "eval" or "zeroshot"
      (continue a pre-trained MHR run as MHR-mu on the multi-task mixture, then evaluate held-out
      tasks with no task data).
    model_dir: where checkpoints, the operative config, metrics and results go.
    model_config: the backbone.
    adapter_config: the adapters and their mode; None trains the whole backbone (mode ``full``).
      ``n_tasks`` is set from the task table.
    optimizer_config: optimizer; ``total_steps`` is set to ``train_config.steps``.
    data_config: mixture, evaluation tasks, lengths, batch size.
    train_config: the loop.
    mesh_config: the ('data', 'model') device mesh.
    sharding_strategy: "dp", "tp", "fsdp" or "fsdp_tp" (see ``sharding.logical_rules``).
    dry_run: check the configuration and stop before building anything.
  """
  run_kind = modes.get_kind(kind)
  if dry_run:
    return {}
  # Registered first, so that the written operative config holds the registrations' bindings
  # (register_t0.shots, ...): gin lists a configurable only once it has been called.
  data_config.register()
  path = _prepare_model_dir(model_dir, run_kind)
  optimizer_config = dataclasses.replace(optimizer_config, total_steps=max(train_config.steps, 1))
  with contextlib.ExitStack() as closing:
    ckpt = checkpoints.CheckpointManager(str(path / "checkpoints"),
                                         max_to_keep=train_config.keep_checkpoints)
    closing.callback(ckpt.close)
    if run_kind.needs_own_checkpoint and ckpt.latest_step() is None:
      raise errors.CheckpointError(
          f"kind {run_kind.name!r} needs a checkpoint in {path / 'checkpoints'}")
    state = build_state(run_kind, path, model_config, adapter_config, optimizer_config,
                        data_config, train_config, mesh_config, sharding_strategy,
                        adapter_fields_set=adapter_fields_bound())
    restore(state, ckpt)
    reporter = reporting.Reporter(path, train_config.steps, start_step=state.start_step,
                                  enabled=jax.process_index() == 0, prefix=f"{path.name} ")
    closing.callback(reporter.close)
    t_start = time.perf_counter()
    step, last_loss = train_loop(state, ckpt, data_config, train_config, reporter)
    seconds = time.perf_counter() - t_start
    return finish(state, data_config, reporter, step=step, last_loss=last_loss, seconds=seconds)


def adapter_fields_bound() -> Optional[frozenset]:
  """The ``AdapterConfig`` fields gin binds (in a gin file or a ``--gin.`` flag, to any value,
  the default included) when gin builds the run's adapter config (``run.adapter_config =
  @AdapterConfig()``); None when it does not (a config passed in Python).

  A fine-tuning run keeps these and takes the others from its checkpoint (``carry_over``), as the
  authors' ``pl_finetune.py`` keeps the arguments a config file or flag set
  (``Config.was_overridden``). A scoped reference (``@s/AdapterConfig()``) also sees the bindings
  of its enclosing scopes, as gin applies them.
  """
  try:
    ref = gin.query_parameter("run.adapter_config")
  except ValueError:
    return None
  if getattr(getattr(ref, "configurable", None), "name", None) != "AdapterConfig":
    return None
  scopes = list(ref.scopes)
  prefixes = ["/".join(scopes[:i]) for i in range(len(scopes) + 1)]
  bound = set()
  for field in dataclasses.fields(adapters.AdapterConfig):
    for prefix in prefixes:
      try:
        gin.query_parameter(f"{prefix}/AdapterConfig.{field.name}" if prefix
                            else f"AdapterConfig.{field.name}")
      except ValueError:
        continue
      bound.add(field.name)
  return frozenset(bound)


def _prepare_model_dir(model_dir: str, kind: modes.RunKind) -> epath.Path:
  """The model directory (local or a bucket), created, with the operative config written into
  it."""
  path = paths.run_dir(model_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    # An evaluation of a finished run writes beside it without replacing its files.
    if jax.process_index() == 0:
      (path / f"config{kind.output_suffix}.gin").write_text(gin.operative_config_str())
  except Exception as e:  # OSError locally; a bucket's backend has its own (tf.errors.OpError)
    raise errors.FileSystemError(
        f"cannot write to the model directory {path}: {getattr(e, 'strerror', None) or e}"
    ) from e
  return path


# ----------------------------------------------------------------------------------------------
# Stage 2: restore.


def restore(state: RunState, ckpt: checkpoints.CheckpointManager) -> None:
  """Restores this run's newest intact checkpoint, if any, and sets ``state.start_step``.

  Newer steps that are damaged are named and moved aside, and a run with nothing intact stops
  naming them (``checkpoints.CheckpointManager.restore_latest``): never a silent restart.
  """
  resumed = ckpt.restore_latest(state.trainable, state.opt_state, expected=state.metadata)
  if resumed is None:
    return
  state.trainable, state.opt_state, saved = resumed
  position = saved.get("data_position")
  state.start_step = int(position) if position is not None else int(saved["step"])
  log.info("resumed %s at step %d", state.model_dir, state.start_step)


# ----------------------------------------------------------------------------------------------
# Stage 3: the training loop.


def train_loop(state: RunState, ckpt: checkpoints.CheckpointManager, data_cfg: DataConfig,
               train_cfg: TrainConfig, reporter: reporting.Reporter) -> tuple[int, Optional[float]]:
  """Trains from ``state.start_step`` to ``train_cfg.steps``; returns (last step, last loss).

  Saves a checkpoint every ``checkpoint_every`` steps and at the end, and stops with
  ``errors.NonFiniteLossError`` at a non-finite loss (that step was not applied).
  """
  step, last_loss = state.start_step, None
  if not state.kind.trains:
    return step, last_loss
  rows = sharding.host_batch_rows(state.mesh, data_cfg.batch_size)
  iters = [data.HostBatches(name, table, data_cfg.feature_lengths, data_cfg.batch_size,
                            rows=rows, data_shards=data_cfg.data_shards or jax.process_count(),
                            seed=train_cfg.seed, start_batch=step, n_choices=state.n_choices)
           for name, table in state.copies]
  keys = data.BATCH_KEYS + (("is_correct",) if state.n_choices else ())
  base_key = jax.random.key(train_cfg.seed)
  while step < train_cfg.steps:
    host = [{k: b[k] for k in keys} for b in (next(it) for it in iters)]
    # Vmapped: [copies, B, ...] host arrays, one batch per task.
    host = jax.tree.map(lambda *xs: np.stack(xs), *host) if state.vmapped else host[0]
    host = length_buckets.trim(host, data_cfg.length_buckets)
    batch = data.to_global(host, state.batch_sharding)
    rng = jax.random.fold_in(base_key, step)
    state.trainable, state.opt_state, metrics = state.step_fn(
        state.trainable, state.frozen, state.opt_state, batch, rng)
    step += 1
    if not bool(np.all(np.asarray(metrics["is_finite"]))):
      ckpt.wait_until_finished()
      raise errors.NonFiniteLossError(
          f"non-finite loss at step {step} of {state.model_dir} (loss "
          f"{np.asarray(metrics['loss'])}); the step was not applied and the last good "
          f"checkpoint (step {ckpt.latest_step()}) is intact")
    last = step == train_cfg.steps
    if step % train_cfg.log_every == 0 or last:
      logged = {k: float(np.mean(np.asarray(v))) for k, v in metrics.items() if k != "is_finite"}
      last_loss = logged["loss"]
      reporter.scalars(step, logged)
      reporter.progress(step, last_loss)
    if step % train_cfg.checkpoint_every == 0 or last:
      ckpt.save(step, state.trainable, state.opt_state, data_position=step,
                metadata=state.metadata)
    if train_cfg.eval_every and step % train_cfg.eval_every == 0 and not last:
      for name, res in evaluate_copies(state, data_cfg, step).items():
        reporter.scalars(step, res, split=f"eval/{name}")
  ckpt.wait_until_finished()
  return step, last_loss


# ----------------------------------------------------------------------------------------------
# Stage 4: finish.


def finish(state: RunState, data_cfg: DataConfig, reporter: reporting.Reporter, *, step: int,
           last_loss: Optional[float], seconds: float) -> dict:
  """Evaluates, writes ``results.json`` (``results_eval.json`` for ``eval``) and returns it."""
  results = {"kind": state.kind.name, "mode": state.mode.name, "resumed_from": state.start_step,
             "steps": step, "final_loss": last_loss, "train_seconds": seconds,
             "parameters": state.counts, "eval": {}}
  if data_cfg.eval_tasks or state.vmapped:
    results["eval"] = evaluate_copies(state, data_cfg, step)
    for name, res in results["eval"].items():
      reporter.scalars(step, res, split=f"eval/{name}")
  if jax.process_index() == 0:
    out = state.model_dir / f"results{state.kind.output_suffix}.json"
    out.write_text(json.dumps(results, indent=1, default=float))
  return results


def evaluate_copies(state: RunState, data_cfg: DataConfig, step: int) -> dict:
  """Evaluation of each program copy on its own task (vmapped) or on the evaluation tasks.

  Tasks outside the run's task table (zero-shot) are evaluated through the mode's
  ``zero_shot_task_id``. seqio's loggers write to ``model_dir/inference_eval`` (TensorBoard and
  JSON), as in t5x. Unless vmapped (where each copy evaluates its own task), T0's templates also
  give one score per held-out dataset, ``t0_<dataset>`` (`mhr_jax.protocol`), the random
  template of each example drawn with the run's seed.
  """
  out = {}
  for i, (name, table) in enumerate(state.copies):
    trainable = steps.unstack(state.trainable, i) if state.vmapped else state.trainable
    model = nnx.merge(state.graphdef, trainable, state.frozen)
    tasks = [name] if state.vmapped else data_cfg.eval_tasks
    override = None if state.vmapped else state.mode.zero_shot_task_id
    out.update(evaluation.evaluate(
        model, table, data_cfg, tasks=tasks, task_id_override=override,
        log_dir=evaluation.log_dir_of(state.model_dir), step=step,
        dataset_of=None if state.vmapped else t0.dataset_of, seed=state.seed))
  return out
