"""The one gin-configured ``run``: pre-train, fine-tune, evaluate, continue zero-shot MHR-mu.

Read top to bottom, a run is:

  1. Task table  : the run's tasks -> ids (derived from the mixture; extended for fine-tuning).
  2. Model       : T5 backbone (preset, Hugging Face directory, or a ``full`` run's checkpoint),
                   adapters of the run's mode, and for fine-tuning the pre-training checkpoint
                   followed by the mode transition (new routing rows, MHR-z, MHR-mu).
  3. Split       : (graphdef, trainable, frozen); the frozen part gets no gradient, no optimizer
                   state, and is never checkpointed by this run.
  4. Shard       : mesh and logical-axis rules -> shardings of every state; jit the step.
  5. Restore     : this run's latest checkpoint, if any (trainable, optimizer, step, data position).
  6. Loop        : step, stop on a non-finite loss (the last good checkpoint stays), log, save,
                   evaluate.
  7. Finish      : final checkpoint, evaluation, results JSON.

Several held-out tasks can be fine-tuned in one program (``TrainConfig.vmap_tasks``): each task
gets its own copy of the trainable state, stacked on a leading axis, over the shared frozen
backbone, and the step is ``jax.vmap``-ed over that axis.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhr_jax import (adapters, checkpoints, data, evaluation, hf_import, models, network,
                     optimizers, reporting, sharding, steps)

import tasks.mixtures  # noqa: E402,F401  (registers the task collections)

log = logging.getLogger("mhr_jax.trainer")

RUN_KINDS = ("pretrain", "finetune", "eval", "zeroshot")
FULL = "full"  # adapter mode: no adapters, the whole backbone trains
# The backbone's parameters: everything but what sits in adapter slots.
BACKBONE = nnx.All(nnx.Param, nnx.Not(nnx.Any(
    adapters.AdapterParam, adapters.RouterParam, adapters.FrozenRouterParam)))


# ----------------------------------------------------------------------------------------------
# Configuration (gin configures these and ``run``; nothing deeper).


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The backbone.

  Attributes:
    size: a preset of ``network.PRESETS`` (ignored when ``hf_checkpoint`` is set).
    overrides: T5Config fields to override (e.g. ``vocab_size``, ``dtype``, ``dropout_rate``).
    hf_checkpoint: a Hugging Face T5 directory to load the backbone from.
    backbone_run: a model directory of a ``full``-mode run whose final parameters are the backbone.
  """

  size: str = "tiny"
  overrides: dict = dataclasses.field(default_factory=dict)
  hf_checkpoint: Optional[str] = None
  backbone_run: Optional[str] = None

  def t5_config(self) -> network.T5Config:
    if self.hf_checkpoint:
      return hf_import.config_from_hf(hf_import.read_config(self.hf_checkpoint), **self.overrides)
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
    t0_data_dir: registers the T0 held-out tasks from this folder (``tasks.t0.register_t0``).
    super_ni_dir: registers Super-NaturalInstructions from this folder
      (``tasks.super_ni.register_super_ni``).
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
  t0_data_dir: Optional[str] = None
  super_ni_dir: Optional[str] = None
  data_shards: Optional[int] = None

  def register(self) -> None:
    """Registers the collections that read local files (idempotent)."""
    if self.t0_data_dir:
      from tasks import t0

      t0.register_t0(self.t0_data_dir)
    if self.super_ni_dir:
      from tasks import super_ni

      super_ni.register_super_ni(self.super_ni_dir)


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
    label_smoothing: of the token loss.
    loss_normalization: "tokens" or "batch" (see ``models.cross_entropy_loss``).
    vmap_tasks: fine-tune each task of the mixture in its own copy, in one vmapped program.
    init_from: for fine-tuning and zero-shot: the pre-training run's model directory.
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


gin.external_configurable(adapters.AdapterConfig, module="mhr_jax")
gin.external_configurable(optimizers.OptimizerConfig, module="mhr_jax")
gin.external_configurable(sharding.MeshConfig, module="mhr_jax")


# ----------------------------------------------------------------------------------------------
# 1-2. Task table and model.


def _table_for(kind: str, data_cfg: DataConfig, parent: Optional[dict]) -> data.TaskIdTable:
  """The run's task table: the mixture's, or the pre-training table extended with new tasks."""
  own = data.TaskIdTable.from_mixture(data_cfg.mixture)
  if parent is None:
    return own
  saved = data.TaskIdTable(tuple(parent["task_names"]))
  return saved.extend(own.names)


def _build_t5(model_cfg: ModelConfig, adapter_cfg: Optional[adapters.AdapterConfig],
              seed: int, mesh, rules) -> network.T5:
  """The backbone with adapters (if any), backbone weights loaded where configured.

  With several devices the model is built directly in its sharded layout (no device ever holds
  all of it) and checkpoint tensors are sent to their shards.
  """
  factory = adapters.make_adapter_factory(adapter_cfg) if adapter_cfg is not None else None
  cfg = model_cfg.t5_config()

  def build():
    rngs = nnx.Rngs(params=seed, dropout=seed + 1, routing=seed + 2)
    return network.T5(cfg, rngs=rngs, adapter_factory=factory)

  model = sharding.init_sharded(build, mesh, rules) if mesh.size > 1 else build()
  if model_cfg.hf_checkpoint:
    tensors = hf_import.read_safetensors_dir(model_cfg.hf_checkpoint)
    hf_import.assign_backbone(model, hf_import.hf_to_params(cfg, tensors))
  elif model_cfg.backbone_run:
    checkpoints.restore_into(model, model_cfg.backbone_run, BACKBONE)
  return model


def _adapter_config(mode: str, adapter_cfg: adapters.AdapterConfig, n_tasks: int):
  if mode == FULL:
    return None
  return dataclasses.replace(adapter_cfg, n_tasks=n_tasks)


def _read_parent(init_from: Optional[str]) -> Optional[dict]:
  if not init_from:
    return None
  return checkpoints.read_metadata(init_from)


def build_model(kind: str, model_cfg: ModelConfig, adapter_cfg: adapters.AdapterConfig,
                table: data.TaskIdTable, parent: Optional[dict], seed: int, mesh, rules):
  """The model of a run, in the state its first step starts from, and its training mode.

  For fine-tuning and zero-shot runs the pre-training run (``parent``) is rebuilt with its own
  adapter configuration and task table, its final trainable state restored, and then the
  transition to this run's mode is applied.
  """
  mode = adapter_cfg.mode if adapter_cfg is not None else FULL
  if parent is None:
    if kind in ("finetune", "zeroshot") and mode in ("mhr_z", "mhr_mu"):
      raise ValueError(f"mode {mode!r} starts from a pre-trained MHR run: set "
                       "TrainConfig.init_from to its model directory")
    return _build_t5(model_cfg, _adapter_config(mode, adapter_cfg, table.n_tasks), seed, mesh,
                     rules), mode
  parent_adapter = parent.get("adapter_config")
  parent_model_cfg = ModelConfig(**parent["model_config"])
  pcfg = adapters.AdapterConfig(**parent_adapter) if parent_adapter else None
  model = _build_t5(parent_model_cfg, pcfg, seed, mesh, rules)
  checkpoints.restore_into(model, parent["path"], trainable_filter(parent["mode"]))
  n_new = table.n_tasks - len(parent["task_names"])
  key = jax.random.key(seed + 3)
  if mode in ("poly", "mhr", "mhr_z"):
    if parent["mode"] not in ("poly", "mhr"):
      raise ValueError(f"mode {mode!r} fine-tunes a routed (poly/mhr) run; {parent['path']} "
                       f"was trained in mode {parent['mode']!r}")
    if n_new > 0:
      adapters.add_tasks(model, n_new, key, keep_existing=True)
  elif mode == "mhr_mu":
    if parent["mode"] in ("poly", "mhr"):
      adapters.to_mhr_mu(model)
    elif parent["mode"] != "mhr_mu":
      raise ValueError(f"mode 'mhr_mu' needs a routed or MHR-mu run; {parent['path']} "
                       f"was trained in mode {parent['mode']!r}")
  elif mode == "lora" and parent["mode"] != "lora":
    raise ValueError(f"mode 'lora' continues a LoRA run; {parent['path']} is {parent['mode']!r}")
  return model, mode


def _check_vocabulary(data_cfg: DataConfig, cfg: network.T5Config) -> None:
  """Token ids past the embedding would be clamped silently by the gather: refuse them."""
  names = [data_cfg.mixture, *data_cfg.eval_tasks]
  for name in names:
    provider = data.get_provider(name)
    for feature in ("inputs", "targets"):
      size = provider.output_features[feature].vocabulary.vocab_size
      if size > cfg.vocab_size:
        raise ValueError(
            f"{name!r} uses a vocabulary of {size} ids for {feature!r} but the model embeds "
            f"{cfg.vocab_size}: choose a checkpoint or ModelConfig.overrides['vocab_size'] to match")


def _adapter_dict(cfg: adapters.AdapterConfig, table: data.TaskIdTable) -> dict:
  out = dataclasses.asdict(dataclasses.replace(cfg, n_tasks=table.n_tasks))
  out["param_dtype"] = jnp.dtype(out["param_dtype"]).name
  return out


def trainable_filter(mode: str):
  """What trains: the whole backbone in ``full`` mode, else the adapter mode's parameters."""
  return nnx.Param if mode == FULL else adapters.trainable_filter(mode)


# ----------------------------------------------------------------------------------------------
# The run.


def _loss(train_cfg: TrainConfig):
  def loss(model, batch):
    return models.loss_fn(model, batch, deterministic=False,
                          label_smoothing=train_cfg.label_smoothing,
                          normalize_by=train_cfg.loss_normalization)
  return loss


def _check_row_sparse(frozen: nnx.State, train_cfg: TrainConfig) -> None:
  """Refuses what the row-sparse routing update does not support, before any step is built."""
  if train_cfg.vmap_tasks:
    raise ValueError("OptimizerConfig.routing_update='rows' cannot be combined with "
                     "TrainConfig.vmap_tasks: use routing_update='dense' for vmapped fine-tuning")
  steps.check_row_sparse_support(frozen)


def _stack(trees: Sequence[Any]):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


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
    kind: "pretrain", "finetune", "eval" or "zeroshot" (continue a pre-trained MHR run as
      MHR-mu on the multi-task mixture, then evaluate held-out tasks with no task data).
    model_dir: where checkpoints, the operative config, metrics and results go.
    model_config: the backbone.
    adapter_config: the adapters and their mode; None trains the whole backbone (mode ``full``).
      ``n_tasks`` is set from the task table.
    optimizer_config: optimizer; ``total_steps`` is set to ``train_config.steps``.
    data_config: mixture, evaluation tasks, lengths, batch size.
    train_config: the loop.
    mesh_config: the ('data', 'model') device mesh.
    sharding_strategy: "dp", "tp" or "fsdp" (see ``sharding.logical_rules``).
    dry_run: check the configuration and stop before building anything.
  """
  if kind not in RUN_KINDS:
    raise ValueError(f"kind must be one of {RUN_KINDS}; got {kind!r}")
  if dry_run:
    return {}
  model_dir = pathlib.Path(model_dir).absolute()  # orbax needs absolute paths
  model_dir.mkdir(parents=True, exist_ok=True)
  # An evaluation of a finished run writes beside it without replacing its files.
  suffix = "_eval" if kind == "eval" else ""
  if jax.process_index() == 0:
    (model_dir / f"config{suffix}.gin").write_text(gin.operative_config_str())
  optimizer_config = dataclasses.replace(optimizer_config, total_steps=max(train_config.steps, 1))
  data_config.register()
  parent = _read_parent(train_config.init_from)
  if kind == "zeroshot":
    if adapter_config is None or adapter_config.mode != "mhr_mu":
      raise ValueError("kind 'zeroshot' trains the averaged adapter: set AdapterConfig.mode='mhr_mu'")

  # 1. Task tables: one per program copy (several only with vmap_tasks).
  if train_config.vmap_tasks:
    own = data.TaskIdTable.from_mixture(data_config.mixture).names
    base = data.TaskIdTable(tuple(parent["task_names"])) if parent else data.TaskIdTable(())
    copies = [(name, base.extend([name])) for name in own]
  else:
    copies = [(data_config.mixture, _table_for(kind, data_config, parent))]
  table = copies[0][1]
  if jax.process_index() == 0:
    table.save(model_dir / "task_ids.json")  # for people; checkpoints carry their own copy

  # 2-3. Model (built sharded over the mesh) and split.
  mesh = sharding.make_mesh(mesh_config)
  rules = sharding.logical_rules(sharding_strategy)
  model, mode = build_model(kind, model_config, adapter_config, table, parent, train_config.seed,
                            mesh, rules)
  _check_vocabulary(data_config, model.config)
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(mode), ...)
  counts = adapters.parameter_counts(model, mode) if mode != FULL else {
      "trainable": int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable)))}
  tx = (optimizers.make_full_optimizer(optimizer_config) if mode == FULL
        else optimizers.make_optimizer(optimizer_config, trainable))
  if isinstance(tx, optimizers.RowSparseOptimizer):
    _check_row_sparse(frozen, train_config)
  n_copies = len(copies)

  # 4. Shard and jit.
  step_fn = steps.make_train_step(graphdef, tx, _loss(train_config))
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  frozen = jax.device_put(frozen, frozen_sh)
  if train_config.vmap_tasks:
    # One copy per task on a leading axis; copies replicated, each batch's rows over 'data'.
    trainable = _stack([trainable] * n_copies)
    rep = sharding.replicated(mesh)
    trainable = jax.device_put(trainable, rep)
    opt_state = jax.jit(jax.vmap(tx.init), out_shardings=rep)(trainable)
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA))
    jitted = jax.jit(jax.vmap(step_fn, in_axes=(0, None, 0, 0, None)),
                     in_shardings=(rep, frozen_sh, rep, batch_sh, rep),
                     out_shardings=(rep, rep, rep), donate_argnums=(0, 2))
    train_sh = opt_sh = rep
  else:
    train_sh = sharding.state_shardings(trainable, mesh, rules)
    trainable = jax.device_put(trainable, train_sh)
    opt_state, opt_sh = steps.init_opt_state(tx, trainable, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh)
    jitted = steps.jit_train_step(step_fn, mesh, train_sh, frozen_sh, opt_sh, rules=rules)

  # 5. Restore this run's own latest checkpoint, if any.
  metadata = checkpoints.make_metadata(
      mode=mode, task_table=table.as_dict(), trainable=trainable,
      backbone=model_config.hf_checkpoint or model_config.backbone_run,
      model_config=dataclasses.asdict(model_config),
      adapter_config=_adapter_dict(adapter_config, table) if mode != FULL else None)
  metadata.update(routing_update=(
      "rows" if isinstance(tx, optimizers.RowSparseOptimizer) else "dense"))
  metadata.update(kind=kind, init_from=train_config.init_from,
                  copies=[name for name, _ in copies] if train_config.vmap_tasks else None)
  ckpt = checkpoints.CheckpointManager(str(model_dir / "checkpoints"),
                                       max_to_keep=train_config.keep_checkpoints)
  start = 0
  resumed = ckpt.restore_latest(trainable, opt_state, expected=metadata)
  if resumed is not None:
    trainable, opt_state, saved = resumed
    start = (int(saved["data_position"]) if saved.get("data_position") is not None
             else int(saved["step"]))
  elif kind == "eval":
    raise FileNotFoundError(f"kind 'eval' needs a checkpoint in {model_dir / 'checkpoints'}")

  # 6. Loop.
  iters = [data.HostBatches(name, tbl, data_config.feature_lengths, data_config.batch_size,
                            rows=sharding.host_batch_rows(mesh, data_config.batch_size),
                            data_shards=data_config.data_shards or jax.process_count(),
                            seed=train_config.seed, start_batch=start)
           for name, tbl in copies] if kind != "eval" else []
  reporter = reporting.Reporter(model_dir, train_config.steps, start_step=start,
                                enabled=jax.process_index() == 0,
                                prefix=f"{model_dir.name} ")
  base_key = jax.random.key(train_config.seed)
  step = start
  last_loss = None
  t_start = time.perf_counter()
  while kind != "eval" and step < train_config.steps:
    host = [next(it) for it in iters]
    host = _stack(host) if train_config.vmap_tasks else host[0]
    batch = data.to_global(host, batch_sh)
    rng = jax.random.fold_in(base_key, step)
    trainable, opt_state, metrics = jitted(trainable, frozen, opt_state, batch, rng)
    step += 1
    if not bool(np.all(np.asarray(metrics["is_finite"]))):
      ckpt.wait_until_finished()
      raise FloatingPointError(
          f"non-finite loss at step {step} of {model_dir} (loss {np.asarray(metrics['loss'])}); "
          f"the step was not applied and the last good checkpoint "
          f"(step {ckpt.latest_step()}) is intact")
    if step % train_config.log_every == 0 or step == train_config.steps:
      last_loss = float(np.mean(np.asarray(metrics["loss"])))
      reporter.scalars(step, {"loss": last_loss,
                              "grad_norm": float(np.mean(np.asarray(metrics["grad_norm"])))})
      reporter.progress(step, last_loss)
    if step % train_config.checkpoint_every == 0 or step == train_config.steps:
      ckpt.save(step, trainable, opt_state, data_position=step, metadata=metadata)
    if train_config.eval_every and step % train_config.eval_every == 0 and step < train_config.steps:
      for name, res in _evaluate_copies(graphdef, trainable, frozen, copies, data_config,
                                        train_config.vmap_tasks, mode).items():
        reporter.scalars(step, res, split=f"eval/{name}")
  ckpt.wait_until_finished()
  train_seconds = time.perf_counter() - t_start

  # 7. Finish: evaluate and write results.
  results = {"kind": kind, "mode": mode, "steps": step, "resumed_from": start,
             "final_loss": last_loss,
             "train_seconds": train_seconds, "parameters": counts, "eval": {}}
  if data_config.eval_tasks or train_config.vmap_tasks:
    results["eval"] = _evaluate_copies(graphdef, trainable, frozen, copies, data_config,
                                       train_config.vmap_tasks, mode)
    for name, res in results["eval"].items():
      reporter.scalars(step, res, split=f"eval/{name}")
  reporter.close()
  if jax.process_index() == 0:
    (model_dir / f"results{suffix}.json").write_text(json.dumps(results, indent=1, default=float))
  return results


def _evaluate_copies(graphdef, trainable, frozen, copies, data_cfg: DataConfig, stacked: bool,
                     mode: str) -> dict:
  """Evaluation of each program copy on its own tasks (or the run's evaluation tasks)."""
  out = {}
  zero_shot = mode in ("mhr_mu", "lora", FULL)
  for i, (name, table) in enumerate(copies):
    state = _unstack(trainable, i) if stacked else trainable
    model = nnx.merge(graphdef, state, frozen)
    tasks = [name] if stacked else data_cfg.eval_tasks
    override = 0 if zero_shot and not stacked else None
    out.update(evaluation.evaluate(model, table, data_cfg, tasks=tasks,
                                   task_id_override=override))
  return out
