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
import os
import sys
import threading
import traceback
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


TIMEOUT_ENV = "MHR_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
PEERS_UNREACHABLE_EXIT = 75  # EX_TEMPFAIL: start every process again


def distributed_timeout(timeout_s: Optional[float] = None) -> int:
  """Seconds a process waits for its peers: ``timeout_s``, else ``$MHR_DISTRIBUTED_TIMEOUT``,
  else 300."""
  value = timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
  try:
    seconds = int(float(value))
  except ValueError:
    raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {value!r}") from None
  if seconds <= 0:
    raise ValueError(f"the distributed timeout must be positive; got {seconds} s")
  return seconds


@contextlib.contextmanager
def _exit_unless_done_within(seconds: int, message: str) -> Iterator[None]:
  """Ends the process with ``message`` if the block has not finished after ``seconds``.

  ``jax.distributed.initialize`` waits in C++ for every peer and, at its own deadline, aborts the
  process with a check failure that names neither the coordinator nor the setting to change.
  """
  def give_up():
    print(message, file=sys.stderr, flush=True)
    os._exit(PEERS_UNREACHABLE_EXIT)

  timer = threading.Timer(seconds, give_up)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def maybe_initialize_distributed(
    coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
    process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None,
    *, timeout_s: Optional[float] = None,
) -> bool:
  """Connects the processes of a multi-host run; returns whether it did.

  With no ``coordinator_address`` this is a single-process run and nothing happens (on Cloud
  TPU, call ``jax.distributed.initialize()`` without arguments instead: it reads the topology).
  Must run before any other JAX call touches the devices.

  A process whose peers have not all connected within ``distributed_timeout(timeout_s)`` seconds
  exits with status ``PEERS_UNREACHABLE_EXIT`` and a message naming the coordinator, instead of
  waiting forever. Once connected, a peer that stops sending heartbeats for that long (at most
  100 s, jax's default) makes jax end the other processes, so a run that lost a host stops and
  can be restarted from its last checkpoint.
  """
  if not coordinator_address:
    return False
  timeout_s = distributed_timeout(timeout_s)
  message = (
      f"process {process_id} of {num_processes}: the run's processes did not all reach the "
      f"coordinator {coordinator_address} within {timeout_s} s ({TIMEOUT_ENV} or "
      f"--distributed_timeout). Start all {num_processes} processes with the same "
      f"--coordinator_address, and check that {coordinator_address} is reachable from every host.")
  with _exit_unless_done_within(timeout_s, message):
    # jax's own deadline comes later: it is only the backstop for the message above.
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, local_device_ids=local_device_ids,
        initialization_timeout=timeout_s + 60, heartbeat_timeout_seconds=min(timeout_s, 100))
    # The first device query exchanges every process's devices: it waits for the peers too.
    logging.info("jax.distributed: process %d of %d through %s, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), coordinator_address,
                 jax.local_device_count(), jax.device_count())
  return True


@contextlib.contextmanager
def exit_when_peers_are_lost(coordinator_address: Optional[str]) -> Iterator[None]:
  """In a multi-process run, turns a failed collective (a peer died: gloo or NCCL reports a
  reset connection, the coordination service a missing task) into a message naming the
  coordinator and exit status ``PEERS_UNREACHABLE_EXIT``.

  The process exits at once: a normal exit would first wait at jax's shutdown barrier for the
  dead peer and then abort with a check failure. An asynchronous checkpoint save still in
  flight is abandoned; it was never committed, so the next start ignores it.
  """
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"process {jax.process_index()} of {jax.process_count()}: lost contact with the other "
          f"processes of the run (coordinator {coordinator_address}): {first}\nRestart all "
          f"{jax.process_count()} processes; the run resumes from its newest intact checkpoint.",
          file=sys.stderr, flush=True)
    os._exit(PEERS_UNREACHABLE_EXIT)


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
