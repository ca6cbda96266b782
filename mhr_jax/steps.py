"""Pure train and eval steps, split from the model at the jit boundary.

The model is split once into ``(graphdef, trainable, frozen)`` by ``split_model``, the one
place a model is split: ``trainable`` holds the variables a filter selects (for a run,
``adapters.trainable_filter(mode)``: the backbone in full fine-tuning, the adapter's typed
params otherwise), ``frozen`` everything else, including the RNG streams. Gradients and
optimizer state exist for ``trainable`` only.

RNG: a step takes an explicit ``rng`` key. Inside the step every RNG stream of the merged model
(dropout, routing noise, ...) is reseeded from it, so a step is a pure function of its
arguments: the same key gives the same dropout masks on every mesh, the RNG counters in
``frozen`` never change, and ``frozen`` is not an output of the step. The trainer derives the
key of step ``s`` as ``jax.random.fold_in(base_key, s)``, which also makes resumed runs repeat
the masks of uninterrupted ones.

Several tasks can be fine-tuned in one program: ``jit_vmapped_train_step`` runs a train step
over a leading copy axis of the trainable and optimizer states (one copy per task) and of the
batch, over a shared frozen part. The row-sparse routing update has its own step, beside its
optimizer, in ``mhr_jax.row_sparse``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mhr_jax import errors
from mhr_jax import sharding as sharding_lib

# loss_fn(model, batch) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, Any], tuple[jax.Array, dict]]


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param):
  """``(graphdef, trainable_state, frozen_state)`` of a model under a "what trains" filter."""
  graphdef, train_state, frozen_state = nnx.split(model, trainable, ...)
  rng_in_trainable = [p for p, _ in nnx.to_flat_state(train_state.filter(nnx.RngState))]
  if rng_in_trainable:
    raise errors.ConfigError(f"the trainable filter selects RNG state: {rng_in_trainable[:3]}")
  if not jax.tree.leaves(train_state):
    raise errors.ConfigError("the trainable filter selects no variables")
  return graphdef, train_state, frozen_state


def reseed(model: nnx.Module, rng: jax.Array) -> None:
  """Reseeds every RNG stream of ``model`` from ``rng`` (one derived key per stream tag).

  Streams with the same tag still get distinct keys: ``nnx.reseed`` draws one key per stream.
  """
  tags = sorted({stream.key.tag for _, stream in nnx.iter_graph(model)
                 if isinstance(stream, nnx.RngStream)})
  if tags:
    nnx.reseed(model, **{tag: jax.random.fold_in(rng, i) for i, tag in enumerate(tags)})


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    loss_fn: LossFn):
  """A pure ``train_step(trainable, frozen, opt_state, batch, rng)``.

  Returns ``(trainable, opt_state, metrics)``. ``metrics`` has the loss function's metrics plus
  ``loss``, ``grad_norm`` and ``is_finite``; when the loss or a gradient is not finite the
  returned ``trainable`` and ``opt_state`` are the inputs unchanged, so the trainer can stop (or
  skip) without the bad update having touched the state. ``optimizer`` is an optax
  transformation; the row-sparse routing update is ``row_sparse.make_train_step``'s.
  """
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"make_train_step takes an optax GradientTransformation, got "
                    f"{type(optimizer).__name__}; the row-sparse update's step is "
                    "row_sparse.make_train_step")

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
    return (keep_if_bad(is_finite, new_trainable, trainable),
            keep_if_bad(is_finite, new_opt_state, opt_state), metrics)

  return train_step


def keep_if_bad(is_finite: jax.Array, new, old):
  """``new`` where the step was finite, else ``old``, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(is_finite, n, o), new, old)


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


def init_opt_state(optimizer, trainable, mesh: Mesh, rules: sharding_lib.Rules):
  """``(opt_state, opt_shardings)``: the optimizer state created sharded like its parameters.

  ``optimizer`` is an optax transformation or anything with its ``init`` (the row-sparse one).
  """
  abstract = jax.eval_shape(optimizer.init, trainable)
  shardings = sharding_lib.state_shardings(abstract, mesh, rules)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings)(trainable)
  return opt_state, shardings


# ----------------------------------------------------------------------------------------------
# Several copies of the trainable state in one program (one per task), over a shared frozen part.


def stack_copies(tree, n_copies: int):
  """``n_copies`` copies of ``tree`` stacked on a new leading axis."""
  return jax.tree.map(lambda x: jnp.stack([x] * n_copies), tree)


def stack(trees):
  """Trees of equal structure stacked leaf by leaf on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, i: int):
  """Copy ``i`` of a stacked tree."""
  return jax.tree.map(lambda x: x[i], tree)


def init_vmapped(optimizer, trainable, n_copies: int, mesh: Mesh):
  """``(trainable, opt_state)``: ``n_copies`` copies of ``trainable`` and of a fresh optimizer
  state, stacked on a leading axis and replicated over ``mesh``."""
  rep = sharding_lib.replicated(mesh)
  stacked = jax.device_put(stack_copies(trainable, n_copies), rep)
  opt_state = jax.jit(jax.vmap(optimizer.init), out_shardings=rep)(stacked)
  return stacked, opt_state


def vmapped_batch_sharding(mesh: Mesh) -> jax.sharding.NamedSharding:
  """Batches stacked per copy: copies replicated, each copy's rows over ``data``."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding_lib.DATA))


def jit_vmapped_train_step(train_step, mesh: Mesh, frozen_shardings, *,
                           rules: Optional[sharding_lib.Rules] = None,
                           compiler_options: Optional[dict] = None):
  """``train_step`` vmapped over a leading copy axis of ``trainable``, ``opt_state`` and the batch
  (the frozen part and the rng key shared), jitted like ``jit_train_step``.

  The copies are replicated (each is a small adapter state); each copy's batch rows are
  sharded over ``data`` (``vmapped_batch_sharding``). ``trainable`` and ``opt_state`` are
  donated. Metrics come back per copy.
  """
  rep = sharding_lib.replicated(mesh)
  vmapped = jax.vmap(train_step, in_axes=(0, None, 0, 0, None))
  return jax.jit(
      _with_rules(vmapped, mesh, rules),
      in_shardings=(rep, frozen_shardings, rep, vmapped_batch_sharding(mesh), rep),
      out_shardings=(rep, rep, rep), donate_argnums=(0, 2), compiler_options=compiler_options)
