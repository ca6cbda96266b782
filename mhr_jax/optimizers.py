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
is an opt-in lazy update whose cost depends on the batch only; it has its own optimizer and step
in ``mhr_jax.row_sparse``; see ``OptimizerConfig``.

Adafactor is optax's (T5X-style): it factors the second moment only over dimensions of at least
128, whereas the ``transformers`` Adafactor the authors used factors the last two dimensions of
every matrix; small adapter tensors therefore keep a full second moment here.

The frozen backbone gets no gradient and no optimizer state because it never reaches the
optimizer: split the model first and differentiate with respect to the trainable part only::

  graphdef, trainable, frozen = steps.split_model(model, adapters.trainable_filter(mode))
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
from typing import Optional

import jax
import optax
from flax import nnx

from mhr_jax import adapters, errors

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
      raise errors.ConfigError(
          f"optimizer name must be 'adamw' or 'adafactor'; got {self.name!r}")
    if self.routing_update not in ROUTING_UPDATES:
      raise errors.ConfigError(
          f"routing_update must be one of {ROUTING_UPDATES}; got {self.routing_update!r}")
    if self.routing_update == "rows" and self.name != "adamw":
      raise errors.ConfigError("routing_update='rows' is a lazy AdamW update and needs "
                               f"name='adamw'; got name={self.name!r}")
    if self.total_steps < 1:
      raise errors.ConfigError(f"total_steps must be >= 1; got {self.total_steps}")
    if not 0.0 <= self.warmup_fraction < 1.0:
      raise errors.ConfigError(f"warmup_fraction must be in [0, 1); got {self.warmup_fraction}")


def warmup_linear_decay(peak: float, total_steps: int, warmup_fraction: float = 0.06):
  """Linear warm-up from 0 to ``peak`` over ``int(warmup_fraction * total_steps)`` steps, then
  linear decay to 0 at ``total_steps`` (transformers' ``get_linear_schedule_with_warmup``)."""
  warmup = int(warmup_fraction * total_steps)
  decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup])


def _label(variable) -> str:
  if isinstance(variable, adapters.RouterParam):
    return ROUTING
  if isinstance(variable, adapters.AdapterParam):
    return ADAPTERS
  return FROZEN


def param_labels(state):
  """The group of every variable of ``state``: ``"routing"``, ``"adapters"`` or ``"frozen"``."""
  return jax.tree.map(_label, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def base(config: OptimizerConfig, schedule) -> optax.GradientTransformation:
  """The configured AdamW or Adafactor on ``schedule``, without clipping."""
  if config.name == "adamw":
    return optax.adamw(schedule, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                       weight_decay=config.weight_decay)
  return optax.adafactor(schedule, multiply_by_parameter_scale=config.adafactor_scale_parameter)


def make_optimizer(config: OptimizerConfig, state) -> optax.GradientTransformation:
  """The optimizer for ``state`` (normally the ``trainable`` part of ``steps.split_model``).

  Routing logits and adapters each get the configured optimizer with their own peak learning
  rate on the shared schedule; anything else in ``state`` gets a zero update and no state.
  ``routing_update="rows"`` over routing tables is not an optax transformation: build it with
  ``row_sparse.RowSparseOptimizer`` (``row_sparse.applies`` says when).
  """
  if config.routing_update == "rows" and has_routing(state):
    raise errors.ConfigError("routing_update='rows' updates routing tables with "
                             "row_sparse.RowSparseOptimizer and row_sparse.make_train_step")
  transforms = {
      ROUTING: base(config, routing_schedule(config)),
      ADAPTERS: base(config, adapter_schedule(config)),
      FROZEN: optax.set_to_zero(),
  }
  return clipped(config, optax.multi_transform(transforms, param_labels(state)))


def routing_schedule(config: OptimizerConfig):
  """The routing logits' learning rate by step."""
  return warmup_linear_decay(
      config.routing_learning_rate, config.total_steps, config.warmup_fraction)


def adapter_schedule(config: OptimizerConfig):
  """The adapters' (or, in full fine-tuning, every parameter's) learning rate by step."""
  return warmup_linear_decay(config.learning_rate, config.total_steps, config.warmup_fraction)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def has_routing(state) -> bool:
  """Whether ``state`` holds routing tables (``RouterParam``)."""
  return any(isinstance(v, adapters.RouterParam)
             for v in jax.tree.leaves(state, is_leaf=_is_variable))


def make_full_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Full fine-tuning (no adapters): every parameter on ``learning_rate`` and the shared
  schedule, clipped like ``make_optimizer``."""
  return clipped(config, base(config, adapter_schedule(config)))


def clipped(config: OptimizerConfig, tx: optax.GradientTransformation):
  """``tx`` after clipping by global norm, when ``config.grad_clip_norm`` asks for it."""
  if config.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
