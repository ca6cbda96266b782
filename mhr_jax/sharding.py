"""Device mesh, logical-axis rules and sharded initialisation.

Parameters carry logical axis names (``var.get_metadata()["logical_axes"]``, see ``axes.py``);
this module maps them to the two mesh axes ``data`` and ``model`` with a rule table, the scheme
of t5x's ``partitioning.standard_logical_axis_rules`` (google-research/t5x). Activations are
constrained through ``constrain()``, a no-op unless ``activation_rules`` is active.

Multi-host: every process runs the same program; ``maybe_initialize_distributed`` connects them,
``host_batch_rows`` says which rows of the global batch this process must read, and
``global_batch`` assembles the per-process numpy batches into global arrays.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mhr_jax import axes

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

# A rule maps one logical axis name to a mesh axis, a tuple of mesh axes, or None (replicated).
# A name may appear in several rules; the first whose mesh axes are still free and divide the
# dimension wins (t5x's fallback order).
MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]

STRATEGIES = ("dp", "tp", "fsdp", "fsdp_tp")

# XLA options trading run time for compile time: for CPU tests and dry runs, not for training.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the ('data', 'model') mesh; -1 for one axis means "all remaining devices"."""

  data: int = -1
  model: int = 1

  def resolve(self, n_devices: int) -> tuple[int, int]:
    """(data, model) sizes for ``n_devices`` devices, checking they multiply out."""
    data, model = self.data, self.model
    if data == -1 and model == -1:
      raise ValueError("MeshConfig: at most one of data, model may be -1")
    if data == -1:
      if n_devices % model:
        raise ValueError(f"MeshConfig: model={model} does not divide {n_devices} devices")
      data = n_devices // model
    if model == -1:
      if n_devices % data:
        raise ValueError(f"MeshConfig: data={data} does not divide {n_devices} devices")
      model = n_devices // data
    if data * model != n_devices:
      raise ValueError(
          f"MeshConfig: data={data} x model={model} = {data * model}, but there are "
          f"{n_devices} devices")
    return data, model


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'model') mesh over all (global) devices, or over ``devices``.

  Axes are ``AxisType.Auto``: the compiler propagates shardings from the explicit in/out
  shardings and ``constrain()`` calls, as in t5x / pjit.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.resolve(len(devices))
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def logical_rules(strategy: str = "dp") -> Rules:
  """The logical-axis rule table of a sharding strategy.

  Args:
    strategy: "dp" (parameters replicated, batch over ``data``), "tp" (tensor parallel:
      ``mlp``/``heads``/``joined_kv``/``vocab`` and their activations over ``model``), "fsdp"
      (parameters' ``embed`` dimension over ``data``, as t5x's ``parameter_partitioning_dims=2``)
      or "fsdp_tp" (both).

  Adapter and routing axes stay replicated under every strategy: they are a small fraction of
  the parameters; add rules with ``extend_rules`` to shard them.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown sharding strategy {strategy!r}; known: {STRATEGIES}")
  rules: list[tuple[str, MeshAxes]] = [(axes.BATCH, DATA)]
  if strategy in ("tp", "fsdp_tp"):
    rules += [
        (axes.VOCAB, MODEL),
        (axes.MLP, MODEL),
        (axes.HEADS, MODEL),
        (axes.JOINED_KV, MODEL),
        (axes.ACT_MLP, MODEL),
        (axes.ACT_HEADS, MODEL),
    ]
  if strategy in ("fsdp", "fsdp_tp"):
    rules += [(axes.EMBED, DATA)]
  return tuple(rules)


def extend_rules(rules: Rules, extra: Sequence[tuple[str, MeshAxes]]) -> Rules:
  """``rules`` with ``extra`` rules tried first."""
  return tuple(extra) + tuple(rules)


def _mesh_axis_size(mesh: Mesh, mesh_axes: MeshAxes) -> int:
  names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return int(np.prod([mesh.shape[n] for n in names]))


def logical_to_spec(
    logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules: Rules,
    *, fallbacks: Optional[list] = None,
) -> P:
  """The PartitionSpec of an array with these logical axes and shape.

  For each dimension the first rule for its name whose mesh axes are unused so far and whose
  size divides the dimension is taken. A dimension whose rules all fail the divisibility check is
  replicated instead, and ``(dim, name, mesh_axes)`` is appended to ``fallbacks`` when given.
  Names without a rule (and None) are replicated.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for dim, (name, size) in enumerate(zip(logical_axes, shape)):
    chosen = None
    for rule_name, mesh_axes in rules:
      if rule_name != name or mesh_axes is None:
        continue
      names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      unknown = [n for n in names if n not in mesh.shape]
      if unknown:
        raise ValueError(f"rule ({name!r}, {mesh_axes!r}) names mesh axes {unknown} not in mesh")
      if used.intersection(names):
        continue
      if size % _mesh_axis_size(mesh, mesh_axes):
        if fallbacks is not None:
          fallbacks.append((dim, name, mesh_axes))
        continue
      chosen = mesh_axes
      used.update(names)
      break
    spec.append(chosen)
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for every array of ``tree`` (an nnx State, or any pytree holding Variables).

  Variables with ``logical_axes`` metadata are sharded by the rules; other leaves (RNG keys and
  counters, optimizer step counts, plain arrays) are replicated, and so are Variables whose shape
  no longer has the rank of their logical axes: optimizer state derived from a parameter with
  another layout, such as Adafactor's factored row and column statistics and its size-1
  placeholders (small, so replicating them costs little). Returns a tree of the same structure
  with each Variable's value (or bare leaf) replaced by its sharding, usable as jit
  ``in_shardings``/``out_shardings``. Dimensions replicated for lack of divisibility are logged.
  """
  replicated = NamedSharding(mesh, P())
  fallen: list[str] = []

  def one(path, leaf):
    if _is_variable(leaf):
      logical = leaf.get_metadata().get("logical_axes")
      if logical is None or len(logical) != len(leaf.shape):
        return leaf.replace(replicated)
      fallbacks: list = []
      spec = logical_to_spec(logical, leaf.shape, mesh, rules, fallbacks=fallbacks)
      if fallbacks:
        fallen.append(f"{_path_str(path)} {tuple(leaf.shape)} dims {[f[0] for f in fallbacks]}")
      return leaf.replace(NamedSharding(mesh, spec))
    return replicated

  out = jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)
  if fallen:
    logging.info("replicated for lack of divisibility by the mesh: %s", "; ".join(fallen))
  return out


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves carrying ``shardings``: restore targets for orbax."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# Mesh and rules used by constrain() while a train/eval step is being traced.
_ACTIVE: contextvars.ContextVar[Optional[tuple[Mesh, Rules]]] = contextvars.ContextVar(
    "mhr_jax_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes ``constrain()`` shard activations on ``mesh`` by ``rules`` inside the block."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names; a no-op without active rules."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding (scalars, RNG keys, metrics)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over ``data``; usable as the sharding of a whole batch dict."""
  return NamedSharding(mesh, P(DATA))


def init_sharded(build_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Rules, *,
                 compiler_options: Optional[dict] = None) -> nnx.Module:
  """Builds ``build_fn()``'s model directly in its sharded layout.

  The model is first traced abstractly (``nnx.eval_shape``) to find each parameter's sharding;
  construction then runs under ``jit`` with those ``out_shardings``, so each device only ever
  holds its own shards (the sharded-init pattern of flax's lm1b example). ``build_fn`` must be
  deterministic (seed its ``nnx.Rngs`` inside).
  """
  abstract = nnx.eval_shape(build_fn)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings, compiler_options=compiler_options)
  def build_state():
    return nnx.split(build_fn())[1]

  return nnx.merge(graphdef, build_state())


def maybe_initialize_distributed(
    coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
    process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None,
) -> bool:
  """Connects the processes of a multi-host run; returns whether it did.

  With no ``coordinator_address`` this is a single-process run and nothing happens (on Cloud
  TPU, call ``jax.distributed.initialize()`` without arguments instead: it reads the topology).
  Must run before any other JAX call touches the devices.
  """
  if not coordinator_address:
    return False
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def host_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of the global batch that this process's devices hold under ``batch_sharding``.

  The data pipeline of each process reads exactly these rows (its shard of the data) and hands
  them to ``global_batch``.
  """
  data_size = mesh.shape[DATA]
  if global_batch_size % data_size:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the data axis ({data_size})")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = sorted({(idx[0].start or 0, idx[0].stop or global_batch_size)
                 for idx in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start:
    raise ValueError(f"this process's batch rows {rows} are not contiguous; reorder the mesh")
  return slice(start, stop)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Global ``jax.Array``s, sharded by ``batch_sharding``, from this process's numpy rows.

  ``local_batch`` holds the rows ``host_batch_rows`` names (all rows in a single-process run).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
