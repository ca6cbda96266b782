"""Optimizers of Poly / MHR training: parameter groups, the shared schedule, AdamW and Adafactor.

As in the authors' code (Caccia et al., NeurIPS 2023; microsoft/mttl ``get_optimizer.py``) and
``docs/algorithm.md`` section 5:

- groups: routing logits Z (``RouterParam``), adapters (``AdapterParam``), frozen backbone;
- Z has its own absolute learning rate (default 0.1); both groups share one schedule shape:
  linear warm-up over 6% of the steps, then linear decay to 0;
- AdamW (weight decay 0.01, applied to Z too) or Adafactor (no parameter scaling);
- gradient clipping by global norm over everything that trains.

That is the default (``routing_update="dense"``): every step reads, differentiates and updates
the whole routing tables, so its cost grows with the number of tasks. ``routing_update="rows"``
is an opt-in lazy update whose cost depends on the batch only (``RowSparseOptimizer``, run by
``steps.make_train_step``); see ``OptimizerConfig``.

Adafactor is optax's (T5X-style): it factors the second moment only over dimensions of at least
128, whereas the ``transformers`` Adafactor the authors used factors the last two dimensions of
every matrix; small adapter tensors therefore keep a full second moment here.

The frozen backbone gets no gradient and no optimizer state because it never reaches the
optimizer: split the model first and differentiate with respect to the trainable part only::

  graphdef, trainable, frozen = split_trainable(model, mode)
  tx = make_optimizer(opt_config, trainable)
  opt_state = tx.init(trainable)

  def train_step(trainable, frozen, opt_state, batch, key):
    def loss(trainable):
      model = nnx.merge(graphdef, trainable, frozen)
      nnx.reseed(model, routing=key)  # fresh relaxed-Bernoulli noise for this step
      return models.loss_fn(model, batch)[0]
    grads = jax.grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mhr_jax import adapters

ROUTING, ADAPTERS, FROZEN = "routing", "adapters", "frozen"
ROUTING_UPDATES = ("dense", "rows")
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer hyper-parameters.

  Attributes:
    name: ``"adamw"`` (Super-NI) or ``"adafactor"`` (T0).
    learning_rate: peak learning rate of the adapters (1e-3 pre-training; 3e-3 T0 and 1e-3
      Super-NI few-shot).
    routing_learning_rate: peak learning rate of the routing logits, absolute (not a multiplier).
    total_steps: length of the schedule.
    warmup_fraction: fraction of ``total_steps`` of linear warm-up.
    weight_decay: AdamW decoupled weight decay (all trainable parameters, Z included).
    grad_clip_norm: global-norm clipping threshold (1.0 T0, 0.1 Super-NI); None or 0 turns it off.
    adafactor_scale_parameter: Adafactor's relative step scaling by parameter RMS (the authors
      turn it off in pre-training).
    routing_update: how the routing tables (``RouterParam``) are updated.

      ``"dense"`` (default, the authors' semantics): the step differentiates the whole tables
      and AdamW updates all n_tasks rows every step, so rows of tasks absent from the batch
      still move by momentum and weight decay, and the step's cost grows with n_tasks.

      ``"rows"`` (AdamW only): only the rows of the tasks present in the batch are read,
      differentiated and updated, with lazy AdamW (as TensorFlow Addons' ``LazyAdam`` or
      PyTorch's ``SparseAdam``): the first and second moments and the decoupled weight decay
      of absent rows are left untouched; bias correction and the learning-rate schedule use
      the global step count; clipping by global norm uses the same norm as ``"dense"`` (absent
      rows have zero gradient and add nothing). A task's duplicate examples in a batch sum
      their gradients into its row, as in the dense gradient. Adapters keep the ordinary optax
      update. The step's cost then no longer depends on n_tasks: use it when there are many
      tasks (thousands). Not supported with frozen routing rows (``FrozenRouterParam``, MHR-z
      after ``add_tasks``) nor with the trainer's ``vmap_tasks``. Without routing tables
      (``lora``, ``mhr_mu``, full fine-tuning) it is the same as ``"dense"``.
  """

  name: str = "adamw"
  learning_rate: float = 1e-3
  routing_learning_rate: float = 0.1
  total_steps: int = 1000
  warmup_fraction: float = 0.06
  weight_decay: float = 0.01
  grad_clip_norm: Optional[float] = 1.0
  adafactor_scale_parameter: bool = False
  routing_update: str = "dense"

  def __post_init__(self):
    if self.name not in ("adamw", "adafactor"):
      raise ValueError(f"optimizer name must be 'adamw' or 'adafactor'; got {self.name!r}")
    if self.routing_update not in ROUTING_UPDATES:
      raise ValueError(f"routing_update must be one of {ROUTING_UPDATES}; got "
                       f"{self.routing_update!r}")
    if self.routing_update == "rows" and self.name != "adamw":
      raise ValueError(f"routing_update='rows' is a lazy AdamW update and needs name='adamw'; "
                       f"got name={self.name!r}")
    if self.total_steps < 1:
      raise ValueError(f"total_steps must be >= 1; got {self.total_steps}")
    if not 0.0 <= self.warmup_fraction < 1.0:
      raise ValueError(f"warmup_fraction must be in [0, 1); got {self.warmup_fraction}")


def warmup_linear_decay(peak: float, total_steps: int, warmup_fraction: float = 0.06):
  """Linear warm-up from 0 to ``peak`` over ``int(warmup_fraction * total_steps)`` steps, then
  linear decay to 0 at ``total_steps`` (transformers' ``get_linear_schedule_with_warmup``)."""
  warmup = int(warmup_fraction * total_steps)
  decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup])


def split_trainable(model: nnx.Module, mode: str):
  """(graphdef, trainable, frozen) states of ``model``: what trains in ``mode`` and the rest."""
  return nnx.split(model, adapters.trainable_filter(mode), ...)


def _label(variable) -> str:
  if isinstance(variable, adapters.RouterParam):
    return ROUTING
  if isinstance(variable, adapters.AdapterParam):
    return ADAPTERS
  return FROZEN


def param_labels(state):
  """The group of every variable of ``state``: ``"routing"``, ``"adapters"`` or ``"frozen"``."""
  return jax.tree.map(_label, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _base(config: OptimizerConfig, schedule) -> optax.GradientTransformation:
  if config.name == "adamw":
    return optax.adamw(schedule, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                       weight_decay=config.weight_decay)
  return optax.adafactor(schedule, multiply_by_parameter_scale=config.adafactor_scale_parameter)


def make_optimizer(config: OptimizerConfig, state
                   ) -> optax.GradientTransformation | RowSparseOptimizer:
  """The optimizer for ``state`` (normally the ``trainable`` of ``split_trainable``).

  Routing logits and adapters each get the configured optimizer with their own peak learning
  rate on the shared schedule; anything else in ``state`` gets a zero update and no state.

  With ``routing_update="rows"`` and routing tables in ``state`` the result is a
  ``RowSparseOptimizer`` (``init`` like optax; ``steps.make_train_step`` runs its row update),
  otherwise an optax transformation.
  """
  if config.routing_update == "rows" and _has_routing(state):
    return RowSparseOptimizer(config, state)
  transforms = {
      ROUTING: _base(config, _routing_schedule(config)),
      ADAPTERS: _base(config, warmup_linear_decay(
          config.learning_rate, config.total_steps, config.warmup_fraction)),
      FROZEN: optax.set_to_zero(),
  }
  return _clipped(config, optax.multi_transform(transforms, param_labels(state)))


def _routing_schedule(config: OptimizerConfig):
  return warmup_linear_decay(
      config.routing_learning_rate, config.total_steps, config.warmup_fraction)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _has_routing(state) -> bool:
  return any(isinstance(v, adapters.RouterParam)
             for v in jax.tree.leaves(state, is_leaf=_is_variable))


def make_full_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Full fine-tuning (no adapters): every parameter on ``learning_rate`` and the shared
  schedule, clipped like ``make_optimizer``."""
  return _clipped(config, _base(config, warmup_linear_decay(
      config.learning_rate, config.total_steps, config.warmup_fraction)))


def _clipped(config: OptimizerConfig, tx: optax.GradientTransformation):
  if config.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


# ----------------------------------------------------------------------------------------------
# Row-sparse ("lazy") update of the routing tables: routing_update="rows".


class LazyAdamState(NamedTuple):
  """Lazy AdamW state of the routing tables.

  ``m`` and ``v`` have the structure and ``nnx.Variable`` metadata of the routing sub-state
  (full (n_tasks, ...) tables), so they are sharded and checkpointed like the tables; ``count``
  is the global step count used by bias correction and the schedule.
  """

  count: jax.Array
  m: Any
  v: Any


class RowSparseState(NamedTuple):
  """Optimizer state of ``RowSparseOptimizer``: optax state of the non-routing part (adapters)
  and the lazy AdamW state of the routing tables."""

  rest: Any
  routing: LazyAdamState


def split_routing(state: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(routing tables, everything else) of a trainable ``nnx.State``."""
  return nnx.split_state(state, adapters.RouterParam, ...)


def take_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
  """``table[rows]``; out-of-range rows (the fill index of ``jnp.unique``) read zeros."""
  return jnp.take(table, rows, axis=0, mode="fill", fill_value=0)


def put_rows(table: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  """``table`` with ``table[rows] = values``; out-of-range rows write nothing."""
  return table.at[rows].set(values.astype(table.dtype), mode="drop")


class RowSparseOptimizer:
  """AdamW whose routing-table update touches only given rows (``routing_update="rows"``).

  Not an optax transformation: its ``update`` takes the gradients of the batch's routing rows
  (shape (R, ...), R = batch size) next to the gradients of the rest, so that no
  (n_tasks, ...) gradient exists. ``init`` is optax-like (``steps.init_opt_state`` and the
  checkpoints use it unchanged). The semantics are in ``OptimizerConfig``.
  """

  def __init__(self, config: OptimizerConfig, state: nnx.State):
    if config.routing_update != "rows" or config.name != "adamw":
      raise ValueError(f"RowSparseOptimizer needs routing_update='rows' and name='adamw'; got "
                       f"{config.routing_update!r} and {config.name!r}")
    if not isinstance(state, nnx.State):
      raise TypeError(f"routing_update='rows' needs an nnx.State; got {type(state).__name__}")
    self.config = config
    _, rest = split_routing(state)
    # No clipping here: ``update`` clips the rest and the routing rows by one global norm.
    self.rest_tx = optax.multi_transform(
        {ADAPTERS: _base(config, warmup_linear_decay(
            config.learning_rate, config.total_steps, config.warmup_fraction)),
         FROZEN: optax.set_to_zero()},
        param_labels(rest))
    self.routing_schedule = _routing_schedule(config)

  def init(self, state: nnx.State) -> RowSparseState:
    routing, rest = split_routing(state)
    return RowSparseState(
        rest=self.rest_tx.init(rest),
        routing=LazyAdamState(count=jnp.zeros([], jnp.int32),
                              m=jax.tree.map(jnp.zeros_like, routing),
                              v=jax.tree.map(jnp.zeros_like, routing)))

  def update(self, rest_grads, row_grads, opt_state: RowSparseState, rest: nnx.State,
             routing: nnx.State, rows: jax.Array) -> tuple[nnx.State, nnx.State, RowSparseState]:
    """One step: returns (new rest, new routing tables, new optimizer state).

    Args:
      rest_grads: gradients of ``rest`` (adapters).
      row_grads: gradients of the routing rows ``rows`` of every table, shape (R, ...); a row
        index outside the tables (the fill of ``jnp.unique``) must have a zero gradient.
      opt_state: from ``init``.
      rest: the non-routing parameters.
      routing: the full routing tables (n_tasks, ...).
      rows: (R,) row indices, each real row at most once; out-of-range ones are skipped.
    """
    clip = self.config.grad_clip_norm
    if clip:
      # The same norm as the dense gradient: the rows absent from ``rows`` are zero there.
      (rest_grads, row_grads), _ = optax.clip_by_global_norm(clip).update(
          (rest_grads, row_grads), optax.EmptyState())
    rest_updates, rest_state = self.rest_tx.update(rest_grads, opt_state.rest, rest)
    new_rest = optax.apply_updates(rest, rest_updates)
    new_routing, routing_state = self._lazy_adamw(row_grads, opt_state.routing, routing, rows)
    return new_rest, new_routing, RowSparseState(rest_state, routing_state)

  def _lazy_adamw(self, grads, state: LazyAdamState, params, rows):
    """optax.adamw's update on the rows ``rows`` only; other rows and their moments unchanged."""
    b1, b2, eps, wd = ADAM_B1, ADAM_B2, ADAM_EPS, self.config.weight_decay
    lr = self.routing_schedule(state.count)
    count = optax.safe_increment(state.count)
    m_rows = jax.tree.map(lambda m, g: b1 * take_rows(m, rows) + (1 - b1) * g, state.m, grads)
    v_rows = jax.tree.map(lambda v, g: b2 * take_rows(v, rows) + (1 - b2) * g * g,
                          state.v, grads)
    c1 = 1 - jnp.asarray(b1, jnp.float32) ** count
    c2 = 1 - jnp.asarray(b2, jnp.float32) ** count

    def new_params(p, m, v):
      p_rows = take_rows(p, rows)
      step = (m / c1) / (jnp.sqrt(v / c2) + eps) + wd * p_rows
      return put_rows(p, rows, p_rows - lr * step)

    new = jax.tree.map(new_params, params, m_rows, v_rows)
    m = jax.tree.map(lambda m, r: put_rows(m, rows, r), state.m, m_rows)
    v = jax.tree.map(lambda v, r: put_rows(v, rows, r), state.v, v_rows)
    return new, LazyAdamState(count=count, m=m, v=v)
