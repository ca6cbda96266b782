"""Routed LoRA adapters (LoRA, Poly, MHR, MHR-z, MHR-mu) as Flax NNX modules.

Poly (Ponti et al., 2023, "Combining Parameter-efficient Modules for Task-level Generalisation")
and MHR (Caccia et al., NeurIPS 2023, "Multi-Head Adapter Routing for Cross-Task
Generalization"), following the authors' code as written down in ``docs/algorithm.md``. The math
is in ``mhr_jax.routing``; this module holds parameters, modes and mode transitions. It knows
nothing of T5: a network asks ``make_adapter_factory(config)`` for an adapter at each dense layer
path and calls it through the slot protocol of ``mhr_jax.layers.Adapter``.

The modes and their facts are stated once, in ``mhr_jax.modes``. What trains is a filter over
typed parameters (``trainable_filter(mode)``), from the mode's parameter groups:

  group      parameters
  routing    RouterParam (rows of the tasks that train)
  adapters   AdapterParam (lora_a, lora_b)
  backbone   every other nnx.Param (``BACKBONE``)

Routing rows that existed before ``add_tasks`` are moved to a ``FrozenRouterParam`` variable, so
they receive no gradient and no optimizer state in any mode.

Routing noise (relaxed Bernoulli, training only) comes from an ``nnx.RngStream`` tagged
``"routing"`` held by every router, each with its own key. Feed fresh noise each step with
``nnx.reseed(model, routing=jax.random.fold_in(key, step))`` (every router gets a distinct key
derived from it), or carry the streams' ``nnx.RngState`` through the train step.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhr_jax import axes, errors, modes, routing

Array = jax.Array

MODES = modes.ADAPTER_MODES

# Layer-path regexes of the paper's two settings (algorithm.md section 4), matched with re.search
# against paths such as "decoder/layers_1/encoder_decoder_attention/k" or "encoder/layers_0/mlp/wo".
LAYER_PRESETS = {
    # Every attention projection (encoder self, decoder self, cross) and the FFN; ``wi`` is the
    # ungated T5 v1.0 FFN input, ``wi_0``/``wi_1`` the gated T5 v1.1 one.
    "t0": r"(attention/(q|k|v|o)|mlp/(wi|wi_0|wi_1|wo))$",
    # Attention projections only.
    "super_ni": r"attention/(q|k|v|o)$",
}


class RouterParam(nnx.Param):
  """Trainable routing logits Z (rows of tasks that train)."""


class FrozenRouterParam(nnx.Param):
  """Routing logits of tasks that no longer train (rows that existed before ``add_tasks``)."""


class AdapterParam(nnx.Param):
  """LoRA skill inventory (``lora_a``, ``lora_b``)."""


# The backbone's parameters: everything but what sits in adapter slots.
BACKBONE = nnx.All(nnx.Param, nnx.Not(nnx.Any(AdapterParam, RouterParam, FrozenRouterParam)))
# The nnx filter of each parameter group a mode may train (``modes.Mode.trains``).
PARAM_GROUPS = {modes.BACKBONE: BACKBONE, modes.ROUTING: RouterParam,
                modes.ADAPTERS: AdapterParam}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which adapters to build and how they route.

  Attributes:
    mode: one of ``MODES``.
    n_tasks: routing rows per layer; from the data layer's task table, never typed by hand.
    n_skills: K, LoRA skills per layer (1 for ``lora`` and ``mhr_mu``).
    n_splits: S, heads of MHR (1 for Poly).
    lora_rank: r.
    lora_alpha: the LoRA scale is alpha / r.
    layers: a key of ``LAYER_PRESETS`` or a regex searched in each layer path.
    init: ``"authors"`` (lora_a ~ U(-a, a), a = 1/sqrt(3 D)) or ``"peft"`` (kaiming-uniform per
      (split, skill) slice, bound sqrt(S / D)); lora_b = 0 in both.
    relaxed_bernoulli: sample routing with relaxed-Bernoulli noise in training.
    temperature: tau of the relaxed Bernoulli.
    n_frozen_tasks: leading routing rows held as ``FrozenRouterParam``; the state ``add_tasks``
      leaves, so that a fine-tuning checkpoint can be rebuilt before restoring it.
    param_dtype: storage dtype of adapter parameters.
  """

  mode: str = "mhr"
  n_tasks: int = 1
  n_skills: int = 8
  n_splits: int = 1
  lora_rank: int = 1
  lora_alpha: float = 1.0
  layers: str = "t0"
  init: str = "authors"
  relaxed_bernoulli: bool = False
  temperature: float = 1.0
  n_frozen_tasks: int = 0
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    mode = modes.get_mode(self.mode)
    if not mode.has_adapters:
      raise errors.ConfigError(f"mode {self.mode!r} has no adapters: set the run's "
                               f"adapter_config to None; adapter modes are {MODES}")
    if self.init not in ("authors", "peft"):
      raise errors.ConfigError(f"init must be 'authors' or 'peft'; got {self.init!r}")
    if mode.single_split and self.n_splits != 1:
      raise errors.ConfigError(
          f"{self.mode} routes whole adapters: n_splits must be 1, got {self.n_splits}")
    if min(self.n_tasks, self.n_skills, self.n_splits, self.lora_rank) < 1:
      raise errors.ConfigError(f"counts and rank must be >= 1: {self}")
    if not 0 <= self.n_frozen_tasks <= self.n_tasks:
      raise errors.ConfigError(
          f"n_frozen_tasks {self.n_frozen_tasks} not in [0, n_tasks={self.n_tasks}]")
    try:
      re.compile(self.layer_regex)
    except re.error as e:
      raise errors.ConfigError(f"layers {self.layers!r} is not a preset "
                               f"{sorted(LAYER_PRESETS)} nor a valid regex: {e}") from e

  @property
  def layer_regex(self) -> str:
    return LAYER_PRESETS.get(self.layers, self.layers)

  @property
  def routed(self) -> bool:
    return modes.get_mode(self.mode).routed

  @property
  def scale(self) -> float:
    return self.lora_alpha / self.lora_rank


def _check_divisible(in_dim: int, out_dim: int, n_splits: int, path: str) -> None:
  if in_dim % n_splits or out_dim % n_splits:
    raise ValueError(
        f"{path or 'layer'}: in_dim {in_dim} and out_dim {out_dim} must both be divisible by "
        f"n_splits {n_splits}")


def _init_lora_a(key, n_splits, n_skills, in_dim, rank, init, dtype) -> Array:
  """lora_a (S, K, D/S, r) as the authors (or PEFT) draw it."""
  shape = (n_splits, n_skills, in_dim // n_splits, rank)
  if init == "authors":
    bound = 1.0 / math.sqrt(3 * in_dim)
  else:
    # kaiming_uniform_(a=sqrt(5)) on each (r, D/S) slice: bound = 1 / sqrt(fan_in).
    bound = math.sqrt(n_splits / in_dim)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _init_router(key, n_tasks, n_splits, n_skills, dtype) -> Array:
  """Routing logits (T, S*K) ~ U(-1e-3, 1e-3) as the authors draw them."""
  return jax.random.uniform(key, (n_tasks, n_splits * n_skills), jnp.float32, -1e-3, 1e-3
                            ).astype(dtype)


class Router(nnx.Module):
  """One routing matrix Z (n_tasks, n_splits * n_skills) of one adapted layer."""

  def __init__(
      self, n_tasks: int, n_splits: int, n_skills: int, *, relaxed_bernoulli: bool = False,
      temperature: float = 1.0, n_frozen_tasks: int = 0,
      param_dtype=jnp.float32, rngs: nnx.Rngs,
  ):
    self.n_splits = n_splits
    self.n_skills = n_skills
    self.relaxed_bernoulli = relaxed_bernoulli
    self.temperature = temperature
    logits = _init_router(rngs.params(), n_tasks, n_splits, n_skills, param_dtype)
    axes_ = (axes.TASKS, axes.ROUTING)
    self.frozen_router_logits = nnx.data(None)
    if n_frozen_tasks:
      self.frozen_router_logits = FrozenRouterParam(logits[:n_frozen_tasks], logical_axes=axes_)
    self.router_logits = RouterParam(logits[n_frozen_tasks:], logical_axes=axes_)
    self.rngs = nnx.data(None)
    if relaxed_bernoulli:
      seed = rngs["routing"]() if "routing" in rngs else rngs.params()
      self.rngs = nnx.RngStream(seed, tag="routing")

  @property
  def n_tasks(self) -> int:
    frozen = 0 if self.frozen_router_logits is None else self.frozen_router_logits.shape[0]
    return frozen + self.router_logits.shape[0]

  def logits(self) -> Array:
    """All rows of Z, frozen rows first: (T, S*K)."""
    z = self.router_logits[...]
    if self.frozen_router_logits is not None:
      z = jnp.concatenate([self.frozen_router_logits[...], z], axis=0)  # -> (T, S*K)
    return z

  def __call__(self, task_ids: Array, *, deterministic: bool) -> Array:
    """Mixing weights (B, S, K) for ``task_ids`` (B,); NaN rows for out-of-range ids under jit."""
    routing.check_task_ids(task_ids, self.n_tasks)
    key = None
    if self.relaxed_bernoulli and not deterministic:
      key = self.rngs()
    return routing.routing_weights(
        self.logits(), task_ids, n_splits=self.n_splits, n_skills=self.n_skills, key=key,
        temperature=self.temperature)

  def task_weights(self, task_id: int) -> Array:
    """Noiseless (evaluation) weights of one task, (S, K)."""
    return self(jnp.asarray([task_id], jnp.int32), deterministic=True)[0]


class RoutedLoRA(nnx.Module):
  """A LoRA skill inventory mixed per example by a router: Poly (S = 1) and MHR (S > 1).

  lora_a (S, K, D/S, r) and lora_b (S, K, r, O/S); the output change is (x A_b) B_b * alpha / r.
  """

  def __init__(self, in_dim: int, out_dim: int, config: AdapterConfig, *, rngs: nnx.Rngs,
               path: str = ""):
    s, k, r = config.n_splits, config.n_skills, config.lora_rank
    _check_divisible(in_dim, out_dim, s, path)
    self.in_dim, self.out_dim = in_dim, out_dim
    self.n_splits, self.n_skills, self.lora_rank = s, k, r
    self.scale = config.scale
    self.router = Router(
        config.n_tasks, s, k, relaxed_bernoulli=config.relaxed_bernoulli,
        temperature=config.temperature, n_frozen_tasks=config.n_frozen_tasks,
        param_dtype=config.param_dtype, rngs=rngs)
    self.lora_a = AdapterParam(
        _init_lora_a(rngs.params(), s, k, in_dim, r, config.init, config.param_dtype),
        logical_axes=(axes.SPLITS, axes.SKILLS, axes.ADAPTER_IN, axes.RANK))
    self.lora_b = AdapterParam(
        jnp.zeros((s, k, r, out_dim // s), config.param_dtype),
        logical_axes=(axes.SPLITS, axes.SKILLS, axes.RANK, axes.ADAPTER_OUT))
    # Static: every example of a batch has one task (``set_single_task``); no id check then.
    self.single_task = False

  def _inventory(self, dtype) -> tuple[Array, Array]:
    return self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)

  def apply_weights(self, x: Array, weights: Array) -> Array:
    """The output change for per-example mixing weights (B, S, K); x is (B, ..., D), by the
    cheaper exact path for the shapes (``routing.mixed_delta``)."""
    lead = x.shape[:-1]
    x3 = x.reshape(lead[0], -1, self.in_dim)  # (B, ..., D) -> (B, L, D)
    a, b = self._inventory(x.dtype)
    y = routing.mixed_delta(x3, weights.astype(x.dtype), a, b, self.scale)
    return y.reshape(*lead, self.out_dim)  # (B, L, O) -> (B, ..., O)

  def apply_shared(self, x: Array, weights: Array, row_factor: Optional[Array] = None) -> Array:
    """The output change when every example has the weights (S, K): one mixed adapter, applied
    as plain LoRA. ``row_factor`` (B,) multiplies each example's rank-r projection."""
    lead = x.shape[:-1]
    x3 = x.reshape(lead[0], -1, self.in_dim)  # (B, ..., D) -> (B, L, D)
    a_t, b = routing.mix_shared(weights.astype(x.dtype), *self._inventory(x.dtype))
    y = routing.shared_delta(x3, a_t, b, self.scale, row_factor)
    return y.reshape(*lead, self.out_dim)  # (B, L, O) -> (B, ..., O)

  def __call__(self, x: Array, task_ids: Optional[Array], *, deterministic: bool) -> Array:
    """The output change for a batch: one mixed adapter when every example shares its task
    (declared by ``single_task``, or found by comparing the ids), else per-example mixing."""
    weights = self.router(task_ids, deterministic=deterministic)  # (B, S, K)
    if self.router.relaxed_bernoulli and not deterministic:
      return self.apply_weights(x, weights)  # fresh noise per example: no two share weights
    if weights.shape[0] == 1:
      return self.apply_shared(x, weights[0])
    same = jnp.asarray(task_ids) == jnp.asarray(task_ids)[0]  # (B,)
    if self.single_task:
      # Declared: no check, but an example of another task gets NaN outputs, never another
      # task's adapter.
      return self.apply_shared(x, weights[0], jnp.where(same, 1.0, jnp.nan).astype(x.dtype))
    if routing.is_concrete(same):
      return (self.apply_shared(x, weights[0]) if bool(jnp.all(same))
              else self.apply_weights(x, weights))
    return jax.lax.cond(jnp.all(same), lambda: self.apply_shared(x, weights[0]),
                        lambda: self.apply_weights(x, weights))

  def delta_kernel(self, task_id: int) -> Array:
    """(D, O) change of the dense kernel for one task (noiseless routing)."""
    return routing.delta_kernel(
        self.router.task_weights(task_id), self.lora_a[...].astype(jnp.float32),
        self.lora_b[...].astype(jnp.float32), self.scale)

  def averaged(self) -> "LoRA":
    """The MHR-mu adapter: uniform weights 1/K, i.e. mean of A and mean of B per split."""
    a = jnp.mean(self.lora_a[...], axis=1)  # (S, K, D/S, r) -> (S, D/S, r)
    a = a.reshape(self.in_dim, self.lora_rank)  # (S, D/S, r) -> (D, r): splits along D
    b = jnp.mean(self.lora_b[...], axis=1)  # (S, K, r, O/S) -> (S, r, O/S)
    b = jnp.transpose(b, (1, 0, 2))  # (S, r, O/S) -> (r, S, O/S)
    b = b.reshape(self.lora_rank, self.out_dim)  # (r, S, O/S) -> (r, O): splits along O
    return LoRA(a, b, self.scale)


class LoRA(nnx.Module):
  """One plain LoRA adapter shared by all tasks: y = (x A) B * alpha / r.

  lora_a (D, r), lora_b (r, O). Used by the ``lora`` mode and by MHR-mu after collapsing the skills.
  """

  def __init__(self, lora_a: Array, lora_b: Array, scale: float):
    self.in_dim, self.lora_rank = lora_a.shape
    self.out_dim = lora_b.shape[1]
    self.scale = scale
    self.lora_a = AdapterParam(lora_a, logical_axes=(axes.ADAPTER_IN, axes.RANK))
    self.lora_b = AdapterParam(lora_b, logical_axes=(axes.RANK, axes.ADAPTER_OUT))

  @classmethod
  def create(cls, in_dim: int, out_dim: int, config: AdapterConfig, *, rngs: nnx.Rngs,
             path: str = "") -> "LoRA":
    """A freshly initialised LoRA (lora_b = 0)."""
    del path
    r = config.lora_rank
    a = _init_lora_a(rngs.params(), 1, 1, in_dim, r, config.init, config.param_dtype)[0, 0]
    return cls(a, jnp.zeros((r, out_dim), config.param_dtype), config.scale)

  def __call__(self, x: Array, task_ids: Optional[Array] = None, *, deterministic: bool) -> Array:
    del task_ids, deterministic
    dtype, lead = x.dtype, x.shape[:-1]
    x3 = x.reshape(lead[0] if lead else 1, -1, self.in_dim)  # (B, ..., D) -> (B, L, D)
    a_t = self.lora_a[...].astype(dtype).T  # (D, r) -> (r, D)
    y = routing.shared_delta(x3, a_t, self.lora_b[...].astype(dtype), self.scale)
    return y.reshape(*lead, self.out_dim)  # (B, L, O) -> (B, ..., O)

  def delta_kernel(self, task_id: int = 0) -> Array:
    del task_id
    # (D, r) x (r, O) -> (D, O)
    return jnp.einsum("dr,ro->do", self.lora_a[...].astype(jnp.float32),
                      self.lora_b[...].astype(jnp.float32)) * self.scale


def make_adapter_factory(config: AdapterConfig):
  """The ``AdapterFactory`` a network calls at each dense layer: an adapter where the path
  matches ``config.layers``, None elsewhere."""
  pattern = re.compile(config.layer_regex)
  build = RoutedLoRA if config.routed else LoRA.create

  def factory(path: str, in_dim: int, out_dim: int, rngs: nnx.Rngs):
    if not pattern.search(path):
      return None
    return build(in_dim, out_dim, config, rngs=rngs, path=path)

  return factory


# ---------------------------------------------------------------------------------------------
# Finding adapters in a model and changing mode.


def adapter_slots(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  """(path, layer) for every layer of ``model`` whose adapter slot holds an adapter."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and isinstance(getattr(node, "adapter", None),
                                                   (RoutedLoRA, LoRA)):
      yield "/".join(str(p) for p in path), node


def set_single_task(model: nnx.Module, value: bool = True) -> nnx.Module:
  """Declares (or stops declaring) that every batch the model sees has one task, so each routed
  layer mixes one adapter per call without comparing task ids (see ``RoutedLoRA.__call__``);
  for fine-tuning on one task and vmapped per-task copies. In place; returns ``model``."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, RoutedLoRA):
      node.single_task = value
  return model


def single_task_loss(loss_fn):
  """``loss_fn(model, batch)`` for a run whose every batch holds one task: it declares so
  (``set_single_task``) on the model it is given, which a train step merges afresh at every
  trace, before computing the loss."""

  def loss(model, batch):
    set_single_task(model)
    return loss_fn(model, batch)
  return loss


def routers(model: nnx.Module) -> list[Router]:
  """Every router in ``model``."""
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, Router)]


def trainable_filter(mode: str):
  """The ``nnx`` filter of the variables that train in ``mode`` (``modes.Mode.trains``)."""
  groups = sorted(modes.get_mode(mode).trains)
  filters = [PARAM_GROUPS[g] for g in groups]
  return filters[0] if len(filters) == 1 else nnx.Any(*filters)


def start_from(model: nnx.Module, transition: modes.Transition, n_new: int, key: Array):
  """Applies ``transition`` to a parent run's ``model`` (in place), which then holds ``n_new``
  tasks more than the parent: new routing rows for them, or the skills averaged. Returns it."""
  if transition is modes.Transition.NEW_TASK_ROWS and n_new > 0:
    add_tasks(model, n_new, key, keep_existing=True)
  elif transition is modes.Transition.AVERAGE_SKILLS:
    to_mhr_mu(model)
  return model


def add_tasks(model: nnx.Module, n_new: int, key: Array, *, keep_existing: bool = True):
  """Adds routing rows for ``n_new`` new tasks to every router, drawn U(-1e-3, 1e-3).

  With ``keep_existing`` the existing rows stay (frozen, as ``FrozenRouterParam``) and the new tasks
  get ids T .. T + n_new - 1. Without it the routing matrix is replaced by the new rows, ids
  0 .. n_new - 1, as the authors' ``resize_module_logits`` does for few-shot fine-tuning.
  Changes ``model`` in place and returns it.
  """
  if n_new < 1:
    raise ValueError(f"n_new must be >= 1; got {n_new}")
  found = routers(model)
  if not found:
    raise ValueError("add_tasks: the model has no routed adapters")
  for i, router in enumerate(found):
    old = router.logits()
    new = _init_router(jax.random.fold_in(key, i), n_new, router.n_splits, router.n_skills,
                       old.dtype)
    axes_ = (axes.TASKS, axes.ROUTING)
    router.frozen_router_logits = (
        FrozenRouterParam(old, logical_axes=axes_) if keep_existing else None)
    router.router_logits = RouterParam(new, logical_axes=axes_)
  return model


def to_mhr_z(model: nnx.Module, n_new: int, key: Array, *, keep_existing: bool = True):
  """MHR-z fine-tuning: new routing rows for the new task(s); train with mode ``"mhr_z"`` so only
  those rows train (skills, earlier rows and backbone stay frozen). In place; returns ``model``."""
  return add_tasks(model, n_new, key, keep_existing=keep_existing)


def to_mhr_mu(model: nnx.Module):
  """MHR-mu: replaces every routed adapter by its average (one plain LoRA per layer, uniform
  weights 1/K); no routing parameters remain. Train with mode ``"mhr_mu"``; for zero-shot MHR-mu,
  keep training it on the multi-task mixture. In place; returns ``model``."""
  for _, layer in list(adapter_slots(model)):
    if isinstance(layer.adapter, RoutedLoRA):
      layer.adapter = layer.adapter.averaged()
  return model


def merge(model: nnx.Module, task_id: int, *, copy: bool = True):
  """A plain model for one task: each adapter's ``delta_kernel(task_id)`` folded into its dense
  kernel and the adapter removed. Works on a copy unless ``copy=False``."""
  if copy:
    model = nnx.clone(model)
  for r in routers(model):
    routing.check_task_ids(np.asarray([task_id]), r.n_tasks)
  for _, layer in list(adapter_slots(model)):
    kernel = layer.kernel[...]
    delta = layer.adapter.delta_kernel(task_id)
    layer.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    layer.adapter = None
  return model


# ---------------------------------------------------------------------------------------------
# Parameter counts.


def _count(model: nnx.Module, filter_) -> int:
  leaves = jax.tree.leaves(nnx.state(model, filter_))
  return int(sum(np.prod(x.shape) for x in leaves))


def parameter_counts(model: nnx.Module, mode: str) -> dict[str, int]:
  """Parameter counts: routing (trainable rows), frozen routing, adapters, backbone, trainable.

  Works on abstract models (``nnx.eval_shape``) too.
  """
  counts = {
      "routing": _count(model, RouterParam),
      "frozen_routing": _count(model, FrozenRouterParam),
      "adapters": _count(model, AdapterParam),
      "trainable": _count(model, trainable_filter(mode)),
  }
  counts["backbone"] = _count(model, nnx.Param) - (
      counts["routing"] + counts["frozen_routing"] + counts["adapters"])
  return counts
