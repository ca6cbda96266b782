"""Ahead-of-time compile check: lower and compile a run's sharded train step without running it.

    python -m mhr_jax.aot --gin_file=experiments/t0_pretrain.gin --n_tasks=313 --topology=v5e:4x4
    python -m mhr_jax.aot --gin_file=experiments/t0_pretrain.gin --n_tasks=313   # 8 CPU devices

Builds the run's model, optimizer state and batch as abstract arrays (``jax.ShapeDtypeStruct``
with their shardings; nothing is allocated), lowers the jitted train step exactly as the
trainer shards it, compiles it, and prints the per-device memory of the compiled program
(``compiled.memory_analysis()``), so that a sharding mistake or a plan that does not fit shows
up before anyone rents a pod.

Targets:
  ``--topology=v5e:4x4`` (any name ``jax.experimental.topologies`` knows, e.g. ``v4:2x2x2``,
  ``v5p:2x2x2``): compiles for that TPU slice from any machine where libtpu is installed
  (``pip install -e '.[tpu]'``, or only ``pip install libtpu``); no TPU is needed.
  No ``--topology``: the host's devices; on a CPU machine ``--cpu_devices`` fake devices (8).

``abstract_train_state`` is the reusable part: the abstract sharded state of a run from the
library's configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Optional, Sequence

GIB = 2 ** 30
# HBM per device (GiB) of the TPU generations, by ``device_kind`` (Cloud TPU system architecture,
# cloud.google.com/tpu/docs/system-architecture-tpu-vm).
HBM_GIB = {"TPU v2": 8, "TPU v3": 16, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
           "TPU v6 lite": 32}
# libtpu looks for a pod's hosts when it loads; an AOT compile has none (any valid accelerator
# type quiets it: the compile target is the topology).
_LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
               "TPU_ACCELERATOR_TYPE": "v5litepod-4"}


@dataclasses.dataclass
class AbstractTrainState:
  """A run's train state as abstract arrays with shardings (see ``abstract_train_state``).

  Attributes:
    graphdef: the model's structure.
    trainable, frozen, opt_state: trees of ``jax.ShapeDtypeStruct`` carrying their shardings.
    shardings: (trainable, frozen, opt_state) shardings, as ``steps.jit_train_step`` takes them.
    optimizer: the optax transformation, or the ``row_sparse.RowSparseOptimizer``, of the run.
    make_step: ``steps.make_train_step`` or ``row_sparse.make_train_step``, to match it.
    mode: the run's ``modes.Mode`` (``modes.FULL`` without adapters).
    counts: parameter counts (``adapters.parameter_counts``), and ``trainable_per_task``:
      what one task's training holds, the shared trainable parameters and that task's own
      routing row (a few-shot fine-tune of one task trains exactly this).
    mesh, rules: the mesh and logical-axis rules.
  """

  graphdef: Any
  trainable: Any
  frozen: Any
  opt_state: Any
  shardings: tuple
  optimizer: Any
  make_step: Any
  mode: Any
  counts: dict
  mesh: Any
  rules: Any


def abstract_train_state(t5_config, adapter_config, optimizer_config, mesh, rules, *,
                         n_tasks: int = 1, seed: int = 0) -> AbstractTrainState:
  """The abstract, sharded train state of a run; nothing is allocated.

  Args:
    t5_config: the backbone (``trainer.ModelConfig().t5_config()``).
    adapter_config: ``adapters.AdapterConfig`` (None: the whole backbone trains).
    optimizer_config: ``optimizers.OptimizerConfig``.
    mesh, rules: ``sharding.make_mesh(...)`` (any devices, TPU topology ones too) and
      ``sharding.logical_rules(strategy)``.
    n_tasks: routing rows (the mixture's task count).
    seed: as the trainer seeds its ``nnx.Rngs`` (shapes do not depend on it).
  """
  import jax
  from flax import nnx

  from mhr_jax import adapters, modes, network, optimizers, row_sparse, sharding, steps

  mode = modes.FULL if adapter_config is None else modes.get_mode(adapter_config.mode)
  factory = None
  if adapter_config is not None:
    factory = adapters.make_adapter_factory(dataclasses.replace(adapter_config, n_tasks=n_tasks))

  def build():
    rngs = nnx.Rngs(params=seed, dropout=seed + 1, routing=seed + 2)
    return network.T5(t5_config, rngs=rngs, adapter_factory=factory)

  abstract = nnx.eval_shape(build)
  graphdef, trainable, frozen = steps.split_model(abstract, adapters.trainable_filter(mode.name))
  if row_sparse.applies(optimizer_config, trainable):
    row_sparse.check_support(frozen)
    tx, make_step = row_sparse.RowSparseOptimizer(optimizer_config, trainable), \
        row_sparse.make_train_step
  elif mode.has_adapters:
    tx, make_step = optimizers.make_optimizer(optimizer_config, trainable), steps.make_train_step
  else:
    tx, make_step = optimizers.make_full_optimizer(optimizer_config), steps.make_train_step
  opt_state = jax.eval_shape(tx.init, trainable)
  shardings = tuple(sharding.state_shardings(t, mesh, rules)
                    for t in (trainable, frozen, opt_state))
  trees = [sharding.abstract_with_shardings(t, s)
           for t, s in zip((trainable, frozen, opt_state), shardings)]
  return AbstractTrainState(graphdef, *trees, shardings=shardings, optimizer=tx,
                            make_step=make_step, mode=mode, counts=_counts(abstract, mode, n_tasks),
                            mesh=mesh, rules=rules)


def _counts(abstract, mode, n_tasks: int) -> dict:
  """``adapters.parameter_counts`` plus ``trainable_per_task`` (routing rows are per task; the
  rest of what trains is shared by the tasks)."""
  from mhr_jax import adapters, modes

  counts = adapters.parameter_counts(abstract, mode.name)
  rows = counts["routing"] if modes.ROUTING in mode.trains else 0
  counts["trainable_per_task"] = counts["trainable"] - rows + rows // max(n_tasks, 1)
  return counts


def abstract_batch(batch_size: int, lengths: dict, mesh) -> dict:
  """The trainer's batch (``data.BATCH_KEYS``) as abstract arrays sharded over ``data``."""
  import jax
  import jax.numpy as jnp

  from mhr_jax import sharding

  sh = sharding.batch_sharding(mesh)
  li, lt = lengths["inputs"], lengths["targets"]

  def arr(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

  return {"encoder_input_tokens": arr((batch_size, li), jnp.int32),
          "decoder_input_tokens": arr((batch_size, lt), jnp.int32),
          "decoder_target_tokens": arr((batch_size, lt), jnp.int32),
          "decoder_loss_weights": arr((batch_size, lt), jnp.float32),
          "task_ids": arr((batch_size,), jnp.int32)}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded abstract arrays (the largest shard)."""
  import jax

  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


def compile_train_step(state: AbstractTrainState, batch_size: int, lengths: dict, *,
                       label_smoothing: float = 0.0, loss_normalization: str = "tokens",
                       compiler_options: Optional[dict] = None):
  """Lowers and compiles the trainer's jitted train step for ``state``; returns the compiled
  program (``.memory_analysis()``, ``.as_text()``, ...)."""
  import jax

  from mhr_jax import models, sharding, steps

  def loss(model, batch):
    return models.loss_fn(model, batch, deterministic=False, label_smoothing=label_smoothing,
                          normalize_by=loss_normalization)

  step_fn = state.make_step(state.graphdef, state.optimizer, loss)
  jitted = steps.jit_train_step(step_fn, state.mesh, *state.shardings, rules=state.rules,
                                compiler_options=compiler_options)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding.replicated(state.mesh))
  batch = abstract_batch(batch_size, lengths, state.mesh)
  return jitted.lower(state.trainable, state.frozen, state.opt_state, batch, rng).compile()


def state_report(state: AbstractTrainState) -> dict:
  """Devices, parameter counts and the bytes of state one device holds (no compile)."""
  device = state.mesh.devices.flat[0]
  return {"devices": int(state.mesh.devices.size), "mesh": dict(state.mesh.shape),
          "device_kind": device.device_kind, "platform": device.platform,
          "parameters": state.counts,
          "state_bytes": {k: per_device_bytes(t) for k, t in (
              ("trainable", state.trainable), ("frozen", state.frozen),
              ("opt_state", state.opt_state))}}


def memory_report(state: AbstractTrainState, compiled) -> dict:
  """``state_report`` plus the per-device memory of the compiled step (bytes)."""
  mem = compiled.memory_analysis()
  out = state_report(state)
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
               "temp_size_in_bytes", "generated_code_size_in_bytes"):
    out[name] = int(getattr(mem, name))
  # What the program holds at its peak: inputs and outputs (donated ones counted once) and
  # temporaries.
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  hbm = HBM_GIB.get(out["device_kind"])
  if hbm is not None:
    out["hbm_bytes"] = hbm * GIB
    out["fits"] = out["total_bytes"] <= out["hbm_bytes"]
  return out


def format_report(report: dict) -> str:
  """The memory report as lines for people."""
  def gib(b):
    return f"{b / GIB:.3f} GiB" if b >= 2 ** 24 else f"{b / 2 ** 20:.2f} MiB"

  lines = [f"{report['devices']} x {report['device_kind']} ({report['platform']}), mesh "
           f"{report['mesh']}",
           "parameters: " + ", ".join(f"{k} {v:,}" for k, v in report["parameters"].items()),
           "state per device: " + ", ".join(f"{k} {gib(v)}"
                                            for k, v in report["state_bytes"].items())]
  if "total_bytes" not in report:
    return "\n".join(lines + ["(not compiled: state only)"])
  lines += ["per device: " + ", ".join(f"{k.replace('_size_in_bytes', '')} {gib(report[k])}"
                                       for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                 "alias_size_in_bytes", "temp_size_in_bytes")),
            f"per device total (arguments + outputs - aliased + temporaries): "
            f"{gib(report['total_bytes'])}"]
  if "hbm_bytes" in report:
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines.append(f"{verdict} in {gib(report['hbm_bytes'])} of HBM per device")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line: a gin-configured run, compiled.


def tpu_devices(topology: str):
  """The devices of a TPU slice by topology name, for compiling only (needs libtpu).

  Raises:
    errors.ConfigError: libtpu is missing or does not know the topology (jax's message kept).
  """
  from mhr_jax import errors

  for k, v in _LIBTPU_ENV.items():
    os.environ.setdefault(k, v)
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except RuntimeError as e:
    raise errors.ConfigError(f"no TPU topology {topology!r}: {e} (install libtpu: "
                             "pip install -e '.[tpu]')") from e


def _run_argument(name: str, default):
  """``run``'s argument ``name`` as the parsed gin files configure it."""
  import gin

  try:
    value = gin.query_parameter(f"run.{name}")
  except ValueError:
    return default
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


def configured_run(n_tasks: Optional[int]) -> dict:
  """The configs ``trainer.run`` would receive from the parsed gin files, and ``n_tasks``."""
  import inspect

  from mhr_jax import errors, trainer

  defaults = {k: p.default for k, p in inspect.signature(trainer.run).parameters.items()}
  args = {k: _run_argument(k, defaults[k]) for k in (
      "model_config", "adapter_config", "optimizer_config", "data_config", "train_config",
      "mesh_config", "sharding_strategy")}
  if n_tasks is None:
    from mhr_jax import data

    try:
      n_tasks = data.TaskIdTable.from_mixture(args["data_config"].mixture).n_tasks
    except Exception as e:  # seqio raises several types for an unknown name
      raise errors.ConfigError("give --n_tasks (the mixture's task count, the routing rows): "
                               f"{args['data_config'].mixture!r} is not a registered mixture ({e})"
                               ) from e
  args["n_tasks"] = n_tasks
  return args


def check_run(args: dict, devices=None, *, compile_step: bool = True,
              compiler_options: Optional[dict] = None) -> dict:
  """Compiles a configured run's train step on ``devices`` and returns its memory report
  (``state_report`` only, without ``compile_step``)."""
  from mhr_jax import sharding

  opt = dataclasses.replace(args["optimizer_config"],
                            total_steps=max(args["train_config"].steps, 1))
  mesh = sharding.make_mesh(args["mesh_config"], devices=devices)
  rules = sharding.logical_rules(args["sharding_strategy"])
  state = abstract_train_state(args["model_config"].t5_config(), args["adapter_config"], opt,
                               mesh, rules, n_tasks=args["n_tasks"],
                               seed=args["train_config"].seed)
  if not compile_step:
    return state_report(state)
  data_cfg, train_cfg = args["data_config"], args["train_config"]
  compiled = compile_train_step(
      state, data_cfg.batch_size, data_cfg.feature_lengths,
      label_smoothing=train_cfg.label_smoothing, loss_normalization=train_cfg.loss_normalization,
      compiler_options=compiler_options)
  return memory_report(state, compiled)


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m mhr_jax.aot", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_search_path", action="append", default=[])
  parser.add_argument("--topology", help="TPU topology to compile for, e.g. v5e:4x4 (libtpu)")
  parser.add_argument("--cpu_devices", type=int, default=8,
                      help="fake CPU devices without --topology (default 8)")
  parser.add_argument("--n_tasks", type=int, help="routing rows (default: the mixture's tasks)")
  parser.add_argument("--fast_compile", action="store_true",
                      help="XLA options that trade the program's speed for compile time (CPU)")
  parser.add_argument("--state_only", action="store_true",
                      help="report parameters and state per device without compiling")
  parser.add_argument("--json", help="also write the report to this file")
  args, rest = parser.parse_known_args(argv)
  args.gin_bindings = []
  for item in rest:
    if not (item.startswith("--gin.") and "=" in item):
      parser.error(f"unrecognised argument {item!r} (gin bindings are --gin.NAME=VALUE)")
    args.gin_bindings.append(item[len("--gin."):])
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  if not args.topology and "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={args.cpu_devices}").strip()
  from mhr_jax import console, train

  console.quiet_tensorflow()
  console.collapse_repeated_warnings()
  # Macros every run kind requires but the compile does not use.
  train.parse_gin(args.gin_file, ["MODEL_DIR = 'aot'", "MIXTURE = 'aot'", *args.gin_bindings],
                  args.gin_search_path)
  devices = tpu_devices(args.topology) if args.topology else None
  from mhr_jax import sharding

  report = check_run(configured_run(args.n_tasks), devices, compile_step=not args.state_only,
                     compiler_options=sharding.FAST_COMPILE if args.fast_compile else None)
  print(format_report(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return 0 if report.get("fits", True) else 1


if __name__ == "__main__":
  sys.exit(main())
