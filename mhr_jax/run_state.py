"""The first stage of a run: from its configs to the state its loop works on (``build_state``).

The task tables (from the mixture; a parent run's table extended with the new tasks), the model
of the run's mode (backbone, adapters, a parent run's checkpoint and the mode's transition from
it, see ``modes``), its split into (graphdef, trainable, frozen), the optimizer and the step,
sharded over the mesh and jitted. The frozen part gets no gradient, no optimizer state, and is
never checkpointed. The configs are ``trainer``'s dataclasses.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from mhr_jax import (adapters, carry_over, checkpoints, choices, data, errors, hf_import, modes,
                     models, network, optimizers, row_sparse, sharding, steps)

if TYPE_CHECKING:
  from mhr_jax.trainer import DataConfig, ModelConfig, TrainConfig


@dataclasses.dataclass
class RunState:
  """What the stages hand on: the split model, its optimizer state and step, where it runs.

  Attributes:
    kind: the run kind.
    mode: the adapter mode that trains.
    model_dir: the run's directory.
    copies: ``(mixture or task, task table)`` of each program copy; one unless vmapped.
    vmapped: whether the trainable and optimizer states hold one copy per task.
    graphdef, trainable, frozen: the split model (trainable and frozen on the mesh).
    opt_state: the optimizer state.
    step_fn: the jitted ``(trainable, frozen, opt_state, batch, rng) -> (trainable,
      opt_state, metrics)``.
    mesh: the device mesh.
    batch_sharding: of the global batch the step takes.
    metadata: the checkpoints' metadata (``checkpoints.make_metadata``).
    counts: parameter counts (``adapters.parameter_counts``).
    start_step: the step the loop starts from (after ``restore``).
    n_choices: answer choices per example of the T-Few batches (``TrainConfig.loss`` "tfew");
      None for the LM loss.
    seed: the run's seed (``TrainConfig.seed``), which also draws the evaluation's templates
      (``protocol.random_template_accuracy``).
  """

  kind: modes.RunKind
  mode: modes.Mode
  model_dir: epath.Path
  copies: list
  vmapped: bool
  graphdef: Any
  trainable: Any
  frozen: Any
  opt_state: Any
  step_fn: Callable
  mesh: Any
  batch_sharding: Any
  metadata: dict
  counts: dict
  start_step: int = 0
  n_choices: Optional[int] = None
  seed: int = 0


def build_state(kind: modes.RunKind, model_dir: epath.Path, model_cfg: ModelConfig,
                adapter_cfg: Optional[adapters.AdapterConfig],
                opt_cfg: optimizers.OptimizerConfig, data_cfg: DataConfig,
                train_cfg: TrainConfig, mesh_cfg: sharding.MeshConfig,
                strategy: str, adapter_fields_set: Optional[frozenset] = None) -> RunState:
  """Task tables, model, split, optimizer and jitted step of a run, on its mesh.

  ``adapter_fields_set``: the ``AdapterConfig`` fields the run sets itself, which win over a
  parent checkpoint's where they can (``carry_over``); None: those that differ from the defaults.
  """
  mode = mode_of(adapter_cfg)
  kind.check_mode(mode)
  parent = _read_parent(train_cfg.init_from)
  modes.check_start(kind, mode, parent is not None)
  rebuilt = None
  if parent is not None:
    mode.transition_from(parent["mode"], parent["path"])  # a refused mode change comes first
    if adapter_fields_set is None:
      adapter_fields_set = carry_over.fields_set(adapter_cfg)
    rebuilt = carry_over.rebuilt_config(adapter_cfg, parent, adapter_fields_set)
  copies = _task_tables(data_cfg, train_cfg.vmap_tasks, parent)
  n_choices = _n_choices(copies) if kind.trains and train_cfg.loss == "tfew" else None
  table = copies[0][1]
  if jax.process_index() == 0:
    table.save(model_dir / "task_ids.json")  # for people; checkpoints carry their own copy
  _check_vocabulary(data_cfg, _backbone_config(model_cfg, parent).t5_config())
  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.logical_rules(strategy)
  model = build_model(model_cfg, adapter_cfg, table, parent, train_cfg.seed, mesh, rules,
                      rebuilt=rebuilt)
  graphdef, trainable, frozen = steps.split_model(model, adapters.trainable_filter(mode.name))
  # Batches of a one-task mixture (or of one copy per task) hold one task: routed layers then
  # mix one adapter per call instead of one per example.
  single_task = (train_cfg.vmap_tasks
                 or data.TaskIdTable.from_mixture(data_cfg.mixture).n_tasks == 1)
  tx, step_fn, rows = _optimizer_and_step(opt_cfg, mode, graphdef, trainable, frozen, train_cfg,
                                          n_choices, single_task=single_task)
  state = RunState(
      kind=kind, mode=mode, model_dir=model_dir, copies=copies, vmapped=train_cfg.vmap_tasks,
      graphdef=graphdef, trainable=trainable, frozen=frozen, opt_state=None, step_fn=step_fn,
      mesh=mesh, batch_sharding=None, metadata={},
      counts=adapters.parameter_counts(model, mode.name), n_choices=n_choices,
      seed=train_cfg.seed)
  _shard_and_jit(state, tx, mesh, rules)
  # What the model was built with (a parent run's backbone when there is one), so that resuming,
  # exporting or starting from this run rebuilds the same model.
  built_backbone = _backbone_config(model_cfg, parent)
  state.metadata = checkpoints.make_metadata(
      mode=mode.name, task_table=table.as_dict(), trainable=state.trainable,
      backbone=built_backbone.backbone,
      model_config=dataclasses.asdict(built_backbone),
      adapter_config=(_adapter_dict(_built_adapter_config(adapter_cfg, rebuilt, parent, table))
                      if mode.has_adapters else None))
  state.metadata.update(
      routing_update="rows" if rows else "dense", kind=kind.name,
      init_from=train_cfg.init_from, copies=[n for n, _ in copies] if state.vmapped else None)
  return state


def mode_of(adapter_cfg: Optional[adapters.AdapterConfig]) -> modes.Mode:
  """The mode a run trains in: the adapter config's, or ``full`` without adapters."""
  return modes.FULL if adapter_cfg is None else modes.get_mode(adapter_cfg.mode)


def _read_parent(init_from: Optional[str]) -> Optional[dict]:
  return checkpoints.read_metadata(init_from) if init_from else None


def _backbone_config(model_cfg: ModelConfig, parent: Optional[dict]) -> ModelConfig:
  """The backbone the model is built with: a parent run's (of the same config class), if any."""
  return type(model_cfg)(**parent["model_config"]) if parent else model_cfg


def _task_tables(data_cfg: DataConfig, vmap_tasks: bool, parent: Optional[dict]
                 ) -> list[tuple[str, data.TaskIdTable]]:
  """``(mixture or task, task table)`` per program copy: the mixture's table (extended after a
  parent run's tasks), or with ``vmap_tasks`` one copy per task of the mixture."""
  base = data.TaskIdTable(tuple(parent["task_names"])) if parent else data.TaskIdTable(())
  own = data.TaskIdTable.from_mixture(data_cfg.mixture)
  if vmap_tasks:
    return [(name, base.extend([name])) for name in own.names]
  return [(data_cfg.mixture, base.extend(own.names) if parent else own)]


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
  elif model_cfg.t5x_checkpoint:
    from mhr_jax.interop import t5x

    ckpt = t5x.T5XCheckpoint(model_cfg.t5x_checkpoint)
    hf_import.assign_backbone(model, t5x.t5x_to_params(cfg, ckpt))
  elif model_cfg.backbone_run:
    checkpoints.restore_into(model, model_cfg.backbone_run, adapters.BACKBONE)
  return model


def build_model(model_cfg: ModelConfig, adapter_cfg: Optional[adapters.AdapterConfig],
                table: data.TaskIdTable, parent: Optional[dict], seed: int, mesh, rules, *,
                rebuilt: Optional[adapters.AdapterConfig] = None) -> network.T5:
  """The model of a run, in the state its first step starts from.

  Without a parent run: the backbone with fresh adapters for the table's tasks. With one
  (``parent``, from ``checkpoints.read_metadata``): the parent's model rebuilt with ``rebuilt``
  (``carry_over.rebuilt_config``; default: the parent's own adapter configuration), its final
  trainable state restored, then the transition from the parent's mode to this run's applied
  (``modes.Mode.transition_from``).
  """
  mode = mode_of(adapter_cfg)
  if parent is None:
    cfg = (dataclasses.replace(adapter_cfg, n_tasks=table.n_tasks) if mode.has_adapters
           else None)
    return _build_t5(model_cfg, cfg, seed, mesh, rules)
  transition = mode.transition_from(parent["mode"], parent["path"])
  pcfg = rebuilt if rebuilt is not None else carry_over.parent_adapter_config(parent)
  model = _build_t5(_backbone_config(model_cfg, parent), pcfg, seed, mesh, rules)
  checkpoints.restore_into(model, parent["path"], adapters.trainable_filter(parent["mode"]))
  n_new = table.n_tasks - len(parent["task_names"])
  return adapters.start_from(model, transition, n_new, jax.random.key(seed + 3))


def _check_vocabulary(data_cfg: DataConfig, cfg: network.T5Config) -> None:
  """Token ids past the embedding would be clamped silently by the gather: refuse them."""
  names = [data_cfg.mixture, *data_cfg.eval_tasks]
  for name in names:
    provider = data.get_provider(name)
    for feature in ("inputs", "targets"):
      size = provider.output_features[feature].vocabulary.vocab_size
      if size > cfg.vocab_size:
        raise errors.ConfigError(
            f"{name!r} uses a vocabulary of {size} ids for {feature!r} but the model embeds "
            f"{cfg.vocab_size}: choose a checkpoint or ModelConfig.overrides['vocab_size'] to "
            "match")


def _built_adapter_config(adapter_cfg: adapters.AdapterConfig,
                          rebuilt: Optional[adapters.AdapterConfig], parent: Optional[dict],
                          table: data.TaskIdTable) -> adapters.AdapterConfig:
  """The adapter structure the run's model holds (what its checkpoints record)."""
  if parent is None or rebuilt is None:
    return dataclasses.replace(adapter_cfg, n_tasks=table.n_tasks)
  transition = mode_of(adapter_cfg).transition_from(parent["mode"], parent["path"])
  return carry_over.built_config(adapter_cfg, rebuilt, transition, table.n_tasks)


def _adapter_dict(cfg: adapters.AdapterConfig) -> dict:
  out = dataclasses.asdict(cfg)
  out["param_dtype"] = jnp.dtype(out["param_dtype"]).name
  return out


def _n_choices(copies) -> int:
  """Answer choices per example of the T-Few batches: the most any training example has (one
  value for every copy, so that vmapped copies' batches stack)."""
  try:
    return max(choices.max_choices(name, "train") for name, _ in copies)
  except ValueError as e:
    raise errors.ConfigError(f"TrainConfig.loss='tfew' needs multiple-choice examples: {e}") from e


def _loss(train_cfg: TrainConfig, n_choices: Optional[int] = None):
  """The training loss ``(model, batch) -> (loss, metrics)`` that ``TrainConfig.loss`` selects."""
  if train_cfg.loss == "tfew":
    def tfew(model, batch):
      return models.tfew_loss_fn(model, batch, n_choices, deterministic=False,
                                 length_norm=train_cfg.length_norm,
                                 mc_weight=train_cfg.mc_loss,
                                 unlikely_weight=train_cfg.unlikely_loss)
    return tfew

  def loss(model, batch):
    return models.loss_fn(model, batch, deterministic=False,
                          label_smoothing=train_cfg.label_smoothing,
                          normalize_by=train_cfg.loss_normalization)
  return loss


def _optimizer_and_step(opt_cfg: optimizers.OptimizerConfig, mode: modes.Mode, graphdef,
                        trainable, frozen, train_cfg: TrainConfig, n_choices: Optional[int],
                        *, single_task: bool = False):
  """``(optimizer, unjitted step, row_sparse?)``: the row-sparse routing update where the
  config asks for it and the model has routing tables, else an optax optimizer and its step.
  ``n_choices``: the T-Few batches' choices per example (``TrainConfig.loss`` "tfew").
  ``single_task``: every batch holds one task, declared to the routed layers
  (``adapters.single_task_loss``)."""
  loss = _loss(train_cfg, n_choices)
  if single_task:
    loss = adapters.single_task_loss(loss)
  if row_sparse.applies(opt_cfg, trainable):
    row_sparse.check_support(frozen, vmap_tasks=train_cfg.vmap_tasks)
    tx = row_sparse.RowSparseOptimizer(opt_cfg, trainable)
    return tx, row_sparse.make_train_step(graphdef, tx, loss), True
  tx = (optimizers.make_optimizer(opt_cfg, trainable) if mode.has_adapters
        else optimizers.make_full_optimizer(opt_cfg))
  return tx, steps.make_train_step(graphdef, tx, loss), False


def _shard_and_jit(state: RunState, tx, mesh, rules) -> None:
  """Places the state on the mesh, creates the optimizer state and jits the step (in place).

  Vmapped: one copy of the trainable state per task on a leading axis, copies replicated, each
  copy's batch rows over 'data'. Otherwise every state sharded by the logical-axis rules.
  """
  frozen_sh = sharding.state_shardings(state.frozen, mesh, rules)
  state.frozen = jax.device_put(state.frozen, frozen_sh)
  if state.vmapped:
    state.trainable, state.opt_state = steps.init_vmapped(
        tx, state.trainable, len(state.copies), mesh)
    state.step_fn = steps.jit_vmapped_train_step(state.step_fn, mesh, frozen_sh, rules=rules)
    state.batch_sharding = steps.vmapped_batch_sharding(mesh)
    return
  train_sh = sharding.state_shardings(state.trainable, mesh, rules)
  state.trainable = jax.device_put(state.trainable, train_sh)
  state.opt_state, opt_sh = steps.init_opt_state(tx, state.trainable, mesh, rules)
  state.step_fn = steps.jit_train_step(state.step_fn, mesh, train_sh, frozen_sh, opt_sh,
                                       rules=rules)
  state.batch_sharding = sharding.batch_sharding(mesh)
