"""Pure train and eval steps, split from the model at the jit boundary.

The model is split once into ``(graphdef, trainable, frozen)``: ``trainable`` holds the
variables a filter selects (``nnx.Param`` for full fine-tuning, the adapter's typed params for
adapter tuning), ``frozen`` everything else, including the backbone and the RNG streams.
Gradients and optimizer state exist for ``trainable`` only.

RNG: a step takes an explicit ``rng`` key. Inside the step every RNG stream of the merged model
(dropout, routing noise, ...) is reseeded from it, so a step is a pure function of its
arguments: the same key gives the same dropout masks on every mesh, the RNG counters in
``frozen`` never change, and ``frozen`` is not an output of the step. The trainer derives the
key of step ``s`` as ``jax.random.fold_in(base_key, s)``, which also makes resumed runs repeat
the masks of uninterrupted ones.

Routing tables can be updated row-sparsely (``OptimizerConfig.routing_update="rows"``): the
step then differentiates only the rows of the batch's tasks (``make_train_step`` recognises
the ``optimizers.RowSparseOptimizer`` that ``make_optimizer`` returns for it).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mhr_jax import adapters, optimizers, routing
from mhr_jax import sharding as sharding_lib

# loss_fn(model, batch) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict]]


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param):
  """``(graphdef, trainable_state, frozen_state)`` of a model under a "what trains" filter."""
  graphdef, train_state, frozen_state = nnx.split(model, trainable, ...)
  rng_in_trainable = [p for p, _ in nnx.to_flat_state(train_state.filter(nnx.RngState))]
  if rng_in_trainable:
    raise ValueError(f"the trainable filter selects RNG state: {rng_in_trainable[:3]}")
  if not jax.tree.leaves(train_state):
    raise ValueError("the trainable filter selects no variables")
  return graphdef, train_state, frozen_state


def reseed(model: nnx.Module, rng: jax.Array) -> None:
  """Reseeds every RNG stream of ``model`` from ``rng`` (one derived key per stream tag).

  Streams with the same tag still get distinct keys: ``nnx.reseed`` draws one key per stream.
  """
  tags = sorted({stream.key.tag for _, stream in nnx.iter_graph(model)
                 if isinstance(stream, nnx.RngStream)})
  if tags:
    nnx.reseed(model, **{tag: jax.random.fold_in(rng, i) for i, tag in enumerate(tags)})


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation | optimizers.RowSparseOptimizer,
    loss_fn: LossFn):
  """A pure ``train_step(trainable, frozen, opt_state, batch, rng)``.

  Returns ``(trainable, opt_state, metrics)``. ``metrics`` has the loss function's metrics plus
  ``loss``, ``grad_norm`` and ``is_finite``; when the loss or a gradient is not finite the
  returned ``trainable`` and ``opt_state`` are the inputs unchanged, so the trainer can stop (or
  skip) without the bad update having touched the state.

  With an ``optimizers.RowSparseOptimizer`` the step is ``make_row_sparse_train_step``'s.
  """
  if isinstance(optimizer, optimizers.RowSparseOptimizer):
    return make_row_sparse_train_step(graphdef, optimizer, loss_fn)

  def train_step(trainable, frozen, opt_state, batch, rng):

    def compute_loss(train_state):
      model = nnx.merge(graphdef, train_state, frozen, copy=True)
      reseed(model, rng)
      return loss_fn(model, batch)

    (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(trainable)
    updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    grad_norm = optax.tree.norm(grads)
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, is_finite=is_finite)
    return (_keep_if_bad(is_finite, new_trainable, trainable),
            _keep_if_bad(is_finite, new_opt_state, opt_state), metrics)

  return train_step


def _keep_if_bad(is_finite: jax.Array, new, old):
  """``new`` where the step was finite, else ``old``, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(is_finite, n, o), new, old)


def check_row_sparse_support(frozen: nnx.State) -> None:
  """Refuses routers holding frozen rows, which the row-sparse update does not support."""
  if any(isinstance(v, adapters.FrozenRouterParam)
         for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))):
    raise ValueError("OptimizerConfig.routing_update='rows' does not support routers with frozen "
                     "rows (FrozenRouterParam: fine-tuning new tasks after pre-training, MHR-z): "
                     "use routing_update='dense'")


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


def make_row_sparse_train_step(graphdef: nnx.GraphDef,
                               optimizer: optimizers.RowSparseOptimizer, loss_fn: LossFn):
  """``make_train_step``'s step with a row-sparse update of the routing tables.

  The model is merged with only the B rows of each routing table that the batch's tasks use
  (``batch_rows``) and the batch's ``task_ids`` renumbered into them, so autodiff yields
  (B, ...) gradients and no (n_tasks, ...) gradient is ever formed; the optimizer then updates
  those rows and their moments in place (``optimizers.RowSparseOptimizer``). Same contract as
  ``make_train_step``. Routers holding frozen rows (``FrozenRouterParam``) are refused.
  """

  def train_step(trainable, frozen, opt_state, batch, rng):
    check_row_sparse_support(frozen)
    tables, rest = optimizers.split_routing(trainable)
    n_tasks = _n_tasks(tables)
    task_ids = batch["task_ids"]
    routing.check_task_ids(task_ids, n_tasks)  # eager calls: name the bad ids as 'dense' does
    rows, local_ids = batch_rows(task_ids, n_tasks)
    row_tables = jax.tree.map(lambda t: optimizers.take_rows(t, rows), tables)
    local_batch = dict(batch, task_ids=local_ids)

    def compute_loss(rest, row_tables):
      model = nnx.merge(graphdef, rest, row_tables, frozen, copy=True)
      reseed(model, rng)
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

    new_trainable = nnx.merge_state(new_tables, _keep_if_bad(is_finite, new_rest, rest))
    new_opt_state = new_opt_state._replace(
        rest=_keep_if_bad(is_finite, new_opt_state.rest, opt_state.rest),
        routing=new_opt_state.routing._replace(count=_keep_if_bad(
            is_finite, new_opt_state.routing.count, opt_state.routing.count)))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, is_finite=is_finite)
    return new_trainable, new_opt_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: Callable[[nnx.Module, Any], Any]):
  """A pure ``eval_step(trainable, frozen, batch)`` returning ``eval_fn(model, batch)``.

  ``eval_fn`` runs the model deterministically, for example
  ``lambda m, b: models.loss_fn(m, b, deterministic=True)[1]`` or ``models.score_targets``.
  """

  def eval_step(trainable, frozen, batch):
    return eval_fn(nnx.merge(graphdef, trainable, frozen), batch)

  return eval_step


def _with_rules(fn, mesh: Mesh, rules: Optional[sharding_lib.Rules]):
  if rules is None:
    return fn

  def wrapped(*args):
    with sharding_lib.activation_rules(mesh, rules):
      return fn(*args)

  return wrapped


def jit_train_step(train_step, mesh: Mesh, trainable_shardings, frozen_shardings,
                   opt_shardings, *, rules: Optional[sharding_lib.Rules] = None,
                   compiler_options: Optional[dict] = None):
  """``train_step`` jitted with explicit shardings, donating ``trainable`` and ``opt_state``.

  The batch is sharded by ``sharding.batch_sharding``, the rng key and the metrics replicated.
  With ``rules`` the step is traced with ``sharding.activation_rules`` active, so the model's
  ``constrain()`` calls take effect. The donated inputs are invalid after the call: always
  continue with the returned state. ``compiler_options`` go to XLA (for example
  ``sharding.FAST_COMPILE`` for CPU tests).
  """
  rep = sharding_lib.replicated(mesh)
  return jax.jit(
      _with_rules(train_step, mesh, rules),
      in_shardings=(trainable_shardings, frozen_shardings, opt_shardings,
                    sharding_lib.batch_sharding(mesh), rep),
      out_shardings=(trainable_shardings, opt_shardings, rep),
      donate_argnums=(0, 2),
      compiler_options=compiler_options)


def jit_eval_step(eval_step, mesh: Mesh, trainable_shardings, frozen_shardings, *,
                  rules: Optional[sharding_lib.Rules] = None, out_shardings: Any = None,
                  compiler_options: Optional[dict] = None):
  """``eval_step`` jitted with explicit shardings; outputs replicated unless told otherwise."""
  return jax.jit(
      _with_rules(eval_step, mesh, rules),
      in_shardings=(trainable_shardings, frozen_shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=sharding_lib.replicated(mesh) if out_shardings is None else out_shardings,
      compiler_options=compiler_options)


def init_opt_state(optimizer: optax.GradientTransformation, trainable, mesh: Mesh,
                   rules: sharding_lib.Rules):
  """``(opt_state, opt_shardings)``: the optimizer state created sharded like its parameters."""
  abstract = jax.eval_shape(optimizer.init, trainable)
  shardings = sharding_lib.state_shardings(abstract, mesh, rules)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings)(trainable)
  return opt_state, shardings
