"""Our side: the trainer's own train step (``steps.make_train_step``) on a T5 built for a
``StepConfig``, on whichever JAX platform is present (CPU when nothing else is).

Ours runs with an optimizer over the trainable parameters only (a plain optax AdamW, lr 1e-3,
weight decay 0.01, as PEFT's side; or the trainer's optimizer, see ``StepConfig``), dropout 0,
relaxed-Bernoulli routing noise as configured, token-mean cross-entropy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import profiling, timing
from benchmarks.configs import SHAPES, StepConfig, make_batch_np
from mhr_jax import adapters, models, network, optimizers, row_sparse, steps

# Frozen backbone arrays by (shape, parameter path): several of our steps in one process share
# one copy of the backbone (the same random init), as they would share one checkpoint.
BackboneCache = dict[tuple[str, tuple], jax.Array]


def platform() -> dict[str, Any]:
  """The JAX platform the steps run on, for the records."""
  device = jax.devices()[0]
  return {"platform": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count()}


def _none_filter(path, value) -> bool:
  """Only the first encoder layer's norm scale trains: the backward pass then runs through the
  whole network (activation gradients) with no weight gradient of note."""
  del value
  return tuple(str(p) for p in path)[:3] == ("encoder", "layers_0", "pre_attention_layer_norm")


def adapter_config(cfg: StepConfig) -> adapters.AdapterConfig:
  """Our adapters for ``cfg``: on every attention q, k, v, o (the ``super_ni`` layer preset)."""
  routed = cfg.routed
  return adapters.AdapterConfig(
      mode=cfg.method, n_tasks=cfg.n_tasks if routed else 1,
      n_skills=cfg.n_skills if routed else 1, n_splits=cfg.splits,
      lora_rank=cfg.rank, layers="super_ni", relaxed_bernoulli=routed and cfg.routing_noise)


def build_ours(cfg: StepConfig, seed: int = 0) -> tuple[network.T5, Any]:
  """Our model for ``cfg`` and the filter of what trains."""
  t5cfg = network.T5Config(**SHAPES[cfg.shape], dropout_rate=0.0, dtype=cfg.dtype,
                           f32_accumulation=cfg.f32_accumulation)
  if cfg.mode is None:
    return network.T5(t5cfg, rngs=nnx.Rngs(seed)), _none_filter
  acfg = adapter_config(cfg)
  model = network.T5(t5cfg, rngs=nnx.Rngs(seed),
                     adapter_factory=adapters.make_adapter_factory(acfg))
  if cfg.single_task:  # as the trainer declares it for one-task runs
    adapters.set_single_task(model)
  return model, adapters.trainable_filter(acfg.mode)


def make_batch(cfg: StepConfig, seed: int = 0, lead: tuple[int, ...] = ()) -> dict[str, jax.Array]:
  """A feature batch as the trainer feeds it (optionally with leading axes)."""
  inputs, targets, task_ids = (jnp.asarray(x) for x in make_batch_np(cfg, seed, lead))
  shift = models.shift_right
  for _ in lead:
    shift = jax.vmap(shift)
  return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_input_tokens": shift(targets), "task_ids": task_ids}


def make_optimizer_and_step(graphdef: nnx.GraphDef, trainable: nnx.State,
                            routing_update: str = "", learning_rate: float = 1e-3):
  """``(optimizer, unjitted train step)``: a plain AdamW (``routing_update`` "") or the
  trainer's optimizer with that routing update (clipping and warm-up off): ``"rows"`` is
  ``row_sparse``'s optimizer and step where the model has routing tables, as in the trainer."""
  loss = lambda m, batch: models.loss_fn(m, batch, deterministic=False)  # noqa: E731
  if not routing_update:
    tx = optax.adamw(learning_rate, weight_decay=0.01)
    return tx, steps.make_train_step(graphdef, tx, loss)
  config = optimizers.OptimizerConfig(
      learning_rate=learning_rate, routing_learning_rate=learning_rate, warmup_fraction=0.0,
      total_steps=10 ** 9, grad_clip_norm=None, routing_update=routing_update)
  if row_sparse.applies(config, trainable):
    tx = row_sparse.RowSparseOptimizer(config, trainable)
    return tx, row_sparse.make_train_step(graphdef, tx, loss)
  tx = optimizers.make_optimizer(config, trainable)
  return tx, steps.make_train_step(graphdef, tx, loss)


def share_backbone(frozen: nnx.State, cache: BackboneCache, shape: str) -> None:
  """Points ``frozen``'s backbone parameters at the cached arrays of the same path and shape
  (filling the cache with those it lacks). In place."""
  for path, var in nnx.to_flat_state(frozen):
    if type(var) is not nnx.Param:  # adapter and router params are subclasses: not shared
      continue
    cached = cache.get((shape, path))
    if cached is not None and cached.shape == var.shape:
      var.value = cached
    else:
      cache[(shape, path)] = var.value


@dataclasses.dataclass
class OursStep:
  """The library's pure train step for one configuration and the state it starts from."""

  train_step: Callable  # (trainable, frozen, opt_state, batch, rng) -> (trainable, opt, metrics)
  trainable: nnx.State
  frozen: nnx.State
  opt_state: Any
  batch: dict[str, jax.Array]


def ours_step(cfg: StepConfig, seed: int = 0,
              backbone: Optional[BackboneCache] = None) -> OursStep:
  """``steps.make_train_step`` for ``cfg``, with its initial state and batch."""
  model, trainable_filter = build_ours(cfg, seed)
  graphdef, trainable, frozen = steps.split_model(model, trainable_filter)
  del model
  if backbone is not None:
    share_backbone(frozen, backbone, cfg.shape)
  tx, train_step = make_optimizer_and_step(graphdef, trainable, cfg.routing_update)
  return OursStep(train_step, trainable, frozen, tx.init(trainable), make_batch(cfg, seed))


def ours_runner(cfg: StepConfig, compile_ahead: bool = False,
                backbone: Optional[BackboneCache] = None):
  """``(run, state, fn)`` for our jitted train step at ``cfg``.

  ``run(i)`` takes step ``i`` (routing noise from ``fold_in(key, i)``), waits for it and keeps
  the new trainable and optimizer state in ``state`` (``{"t": ..., "o": ...}``). ``fn`` is the
  jitted step, or with ``compile_ahead`` its compiled executable (``fn.as_text()`` is the HLO the
  profiler reads; the first ``run`` then no longer includes compilation).
  """
  s = ours_step(cfg, backbone=backbone)
  base_key = jax.random.key(0)
  fn = jax.jit(s.train_step, donate_argnums=(0, 2))
  if compile_ahead:
    fn = fn.lower(s.trainable, s.frozen, s.opt_state, s.batch, base_key).compile()
  state = {"t": s.trainable, "o": s.opt_state}

  def run(i):
    t, o, metrics = fn(state["t"], s.frozen, state["o"], s.batch, jax.random.fold_in(base_key, i))
    jax.block_until_ready((t, o, metrics))
    state["t"], state["o"] = t, o

  return run, state, fn


def measure_step(cfg: StepConfig, steps_: int, warmup: int, budget_s: float) -> dict[str, Any]:
  """Step times of our model for ``cfg``."""
  run, state, _ = ours_runner(cfg)
  times, first = timing.time_steps(run, steps_, warmup, budget_s)
  n_trainable = sum(x.size for x in jax.tree.leaves(state["t"]))
  return {"times": times, "first_step_s": first, "n_trainable": int(n_trainable)}


def measure_profile(cfg: StepConfig, steps_: int) -> dict[str, Any]:
  """Per-op profile of our train step for ``cfg`` (``profiling.xla_profile``)."""
  run, _, compiled = ours_runner(cfg, compile_ahead=True)
  for i in range(2):
    run(i)
  return profiling.xla_profile(run, compiled.as_text(), steps_)


def measure_peak(n: int, reps: int) -> dict[str, Any]:
  """Float32 n x n matmul rate of XLA on this machine (FLOP/s)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  times, _ = timing.time_steps(lambda i: jax.block_until_ready(f(a, b)), reps, 2, 60.0)
  return {"times": times, "flops": 2.0 * n ** 3}
