"""The row-sparse ("lazy") update of the routing tables: ``OptimizerConfig.routing_update="rows"``.

With thousands of tasks the dense update of the routing tables (every row read, differentiated
and moved by AdamW each step) is a large share of the step. Here the step merges the model with
only the B rows of each routing table that the batch's tasks use (``batch_rows``) and renumbers
the batch's task ids into them, so autodiff yields (B, ...) gradients and no (n_tasks, ...)
gradient is ever formed; ``RowSparseOptimizer`` then updates those rows and their moments in
place with lazy AdamW (as TensorFlow Addons' ``LazyAdam`` or PyTorch's ``SparseAdam``). The
semantics are in ``optimizers.OptimizerConfig``. Routers holding frozen rows
(``FrozenRouterParam``: MHR-z, fine-tuning new tasks after pre-training) are not supported.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mhr_jax import adapters, errors, optimizers, routing, steps


def applies(config: optimizers.OptimizerConfig, trainable) -> bool:
  """Whether ``config`` asks for the row-sparse update and ``trainable`` has routing tables to
  update that way (without them ``"rows"`` is the dense optax update)."""
  return config.routing_update == "rows" and optimizers.has_routing(trainable)


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
  checkpoints use it unchanged). The semantics are in ``optimizers.OptimizerConfig``.
  """

  def __init__(self, config: optimizers.OptimizerConfig, state: nnx.State):
    if config.routing_update != "rows" or config.name != "adamw":
      raise errors.ConfigError(
          f"RowSparseOptimizer needs routing_update='rows' and name='adamw'; got "
          f"{config.routing_update!r} and {config.name!r}")
    if not isinstance(state, nnx.State):
      raise TypeError(f"routing_update='rows' needs an nnx.State; got {type(state).__name__}")
    self.config = config
    _, rest = split_routing(state)
    # No clipping here: ``update`` clips the rest and the routing rows by one global norm.
    self.rest_tx = optax.multi_transform(
        {optimizers.ADAPTERS: optimizers.base(config, optimizers.adapter_schedule(config)),
         optimizers.FROZEN: optax.set_to_zero()},
        optimizers.param_labels(rest))
    self.routing_schedule = optimizers.routing_schedule(config)

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
    b1, b2, eps = optimizers.ADAM_B1, optimizers.ADAM_B2, optimizers.ADAM_EPS
    wd = self.config.weight_decay
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


# ----------------------------------------------------------------------------------------------
# The step.


def check_support(frozen: nnx.State, *, vmap_tasks: bool = False) -> None:
  """Refuses what the row-sparse update does not support, before any step is built."""
  if vmap_tasks:
    raise errors.ConfigError(
        "OptimizerConfig.routing_update='rows' cannot be combined with TrainConfig.vmap_tasks: "
        "use routing_update='dense' for vmapped fine-tuning")
  if any(isinstance(v, adapters.FrozenRouterParam)
         for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))):
    raise errors.ConfigError(
        "OptimizerConfig.routing_update='rows' does not support routers with frozen rows "
        "(FrozenRouterParam: fine-tuning new tasks after pre-training, MHR-z): use "
        "routing_update='dense'")


def _n_tasks(routing_tables: nnx.State) -> int:
  """The number of rows shared by every routing table."""
  sizes = {x.shape[0] for x in jax.tree.leaves(routing_tables)}
  if len(sizes) != 1:
    raise ValueError(f"routing tables with different numbers of rows {sorted(sizes)}: the "
                     "row-sparse update needs one task table for every router")
  return sizes.pop()


def batch_rows(task_ids: jax.Array, n_tasks: int) -> tuple[jax.Array, jax.Array]:
  """``(rows, local_ids)``: the routing rows a batch reads and its task ids into them.

  ``rows`` (B,) holds the distinct valid ids, padded with ``n_tasks`` (outside the tables:
  reads zeros, writes nothing); ``rows[local_ids] == task_ids`` for valid ids. An id outside
  [0, n_tasks) maps to B, outside the B gathered rows, so the router's guard still turns its
  routing into NaN (and the loss non-finite) instead of silently using another row.
  """
  size = task_ids.shape[0]
  valid = (task_ids >= 0) & (task_ids < n_tasks)
  ids = jnp.where(valid, task_ids, n_tasks)
  rows, inverse = jnp.unique(ids, size=size, fill_value=n_tasks, return_inverse=True)
  local_ids = jnp.where(valid, inverse.reshape(task_ids.shape), size)
  return rows, local_ids.astype(task_ids.dtype)


def make_train_step(graphdef: nnx.GraphDef, optimizer: RowSparseOptimizer,
                    loss_fn: steps.LossFn):
  """``steps.make_train_step``'s contract, with the row-sparse update of the routing tables."""

  def train_step(trainable, frozen, opt_state, batch, rng):
    check_support(frozen)
    tables, rest = split_routing(trainable)
    n_tasks = _n_tasks(tables)
    task_ids = batch["task_ids"]
    routing.check_task_ids(task_ids, n_tasks)  # eager calls: name the bad ids as 'dense' does
    rows, local_ids = batch_rows(task_ids, n_tasks)
    row_tables = jax.tree.map(lambda t: take_rows(t, rows), tables)
    local_batch = dict(batch, task_ids=local_ids)

    def compute_loss(rest, row_tables):
      model = nnx.merge(graphdef, rest, row_tables, frozen, copy=True)
      steps.reseed(model, rng)
      return loss_fn(model, local_batch)

    (loss, metrics), (rest_grads, row_grads) = jax.value_and_grad(
        compute_loss, argnums=(0, 1), has_aux=True)(rest, row_tables)
    grad_norm = optax.tree.norm((rest_grads, row_grads))
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A bad step writes no row: every row index becomes the out-of-range fill, which the
    # scatter drops. Selecting old against new over the whole tables instead would cost
    # O(n_tasks) again.
    write_rows = jnp.where(is_finite, rows, n_tasks)
    new_rest, new_tables, new_opt_state = optimizer.update(
        rest_grads, row_grads, opt_state, rest, tables, write_rows)

    keep = steps.keep_if_bad
    new_trainable = nnx.merge_state(new_tables, keep(is_finite, new_rest, rest))
    new_opt_state = new_opt_state._replace(
        rest=keep(is_finite, new_opt_state.rest, opt_state.rest),
        routing=new_opt_state.routing._replace(count=keep(
            is_finite, new_opt_state.routing.count, opt_state.routing.count)))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, is_finite=is_finite)
    return new_trainable, new_opt_state, metrics

  return train_step
