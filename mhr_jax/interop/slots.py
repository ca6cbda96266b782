"""Adapter arrays per layer path: the configuration they imply, filling and reading adapter slots.

Every importer here (PEFT, mttl) first turns its file into ``{layer path: LayerArrays}`` in our
layout (``lora_a`` (S, K, D/S, r), ``lora_b`` (S, K, r, O/S), ``router_logits`` (T, S*K); or a plain
LoRA ``lora_a`` (D, r), ``lora_b`` (r, O)), then uses the functions below, so the checks and the
error messages are the same for every format. Exporters read the same structure back out.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhr_jax import adapters, errors, layers, routing
from mhr_jax.interop import hf_names


class AdapterImportError(errors.CheckpointMismatchError):
  """Adapter tensors that cannot be mapped onto the model; the message names every one."""


@dataclasses.dataclass(frozen=True)
class LayerArrays:
  """One adapted layer's tensors in our layout.

  Attributes:
    lora_a: (S, K, D/S, r) for a routed adapter, (D, r) for a plain LoRA.
    lora_b: (S, K, r, O/S) for a routed adapter, (r, O) for a plain LoRA.
    router_logits: (T, S*K) routing logits, or None for a plain LoRA.
    sources: the names of the tensors these came from, for messages and reports.
  """

  lora_a: np.ndarray
  lora_b: np.ndarray
  router_logits: Optional[np.ndarray] = None
  sources: tuple[str, ...] = ()

  @property
  def routed(self) -> bool:
    return self.lora_a.ndim == 4


@dataclasses.dataclass
class ImportReport:
  """What an import mapped, and what it left out and why."""

  source: str
  layout: str
  mapped: dict[str, str] = dataclasses.field(default_factory=dict)  # source tensor -> our param
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # source tensor -> reason
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"{self.source} ({self.layout}): {len(self.mapped)} tensors mapped, "
             f"{len(self.skipped)} skipped"]
    lines += [f"  note: {n}" for n in self.notes]
    lines += [f"  skipped {k}: {why}" for k, why in sorted(self.skipped.items())]
    return "\n".join(lines)


def exact_regex(paths: Iterable[str]) -> str:
  """A layer regex (``AdapterConfig.layers``) that selects exactly ``paths``."""
  return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def dense_layers(model: nnx.Module) -> dict[str, layers.Dense]:
  """Every adaptable dense layer of ``model`` (abstract models too) by layer path."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, layers.Dense):
      name = "/".join(str(p) for p in path)
      try:
        hf_names.to_module(name)
      except ValueError:
        continue  # the output head
      out[name] = node
  return out


def raise_problems(problems: list[str], what: str) -> None:
  if problems:
    raise AdapterImportError(f"{what}:\n  " + "\n  ".join(problems))


def adapter_config(
    arrays: Mapping[str, LayerArrays], *, lora_alpha: float = 1.0, mode: Optional[str] = None,
) -> adapters.AdapterConfig:
  """The ``AdapterConfig`` whose model has exactly these adapters.

  Every layer must share n_splits, n_skills, rank and n_tasks (one config serves all layers); a
  layer that differs is named. ``mode`` defaults to ``poly`` (S = 1) or ``mhr`` for routed
  arrays and ``lora`` for plain ones.
  """
  if not arrays:
    raise AdapterImportError("no adapter tensors found")
  kinds = {path: a.routed for path, a in arrays.items()}
  if len(set(kinds.values())) > 1:
    plain = sorted(p for p, r in kinds.items() if not r)
    raise AdapterImportError(f"routed and plain LoRA layers mixed; plain: {', '.join(plain)}")
  routed = next(iter(kinds.values()))

  def signature(a: LayerArrays):
    if routed:
      return a.lora_a.shape[0], a.lora_a.shape[1], a.lora_a.shape[3], a.router_logits.shape[0]
    return 1, 1, a.lora_a.shape[1], 1

  groups: dict[tuple, list[str]] = {}
  for path, a in arrays.items():
    groups.setdefault(signature(a), []).append(path)
  if len(groups) > 1:
    raise_problems([f"(n_splits, n_skills, rank, n_tasks) = {sig}: " + ", ".join(
        src for p in sorted(paths) for src in arrays[p].sources or (p,))
        for sig, paths in sorted(groups.items())], "layers differ in shape; one adapter "
        "configuration serves every layer")
  n_splits, n_skills, rank, n_tasks = next(iter(groups))
  mode = mode or (("poly" if n_splits == 1 else "mhr") if routed else "lora")
  return adapters.AdapterConfig(
      mode=mode, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits, lora_rank=rank,
      lora_alpha=lora_alpha, layers=exact_regex(arrays))


def _targets(adapter, a: LayerArrays):
  """(name, our variable, expected shape, value) of each tensor an adapter slot takes."""
  if isinstance(adapter, adapters.RoutedLoRA):
    router = adapter.router
    return [("lora_a", adapter.lora_a, adapter.lora_a.shape, a.lora_a),
            ("lora_b", adapter.lora_b, adapter.lora_b.shape, a.lora_b),
            ("router_logits", None, (router.n_tasks, router.n_splits * router.n_skills),
             a.router_logits)]
  return [("lora_a", adapter.lora_a, adapter.lora_a.shape, a.lora_a),
          ("lora_b", adapter.lora_b, adapter.lora_b.shape, a.lora_b)]


def assign(model: nnx.Module, arrays: Mapping[str, LayerArrays]) -> dict[str, str]:
  """Writes ``arrays`` into the adapter slots of ``model`` (in place).

  Every adapter of the model must receive its tensors with its shapes and every layer of
  ``arrays`` must have an adapter; otherwise nothing is written and ``AdapterImportError`` names
  every missing, unexpected and mis-shaped tensor. Routing rows held frozen
  (``FrozenRouterParam``) receive the leading rows. Returns {source tensor: our parameter path}.
  """
  slots = dict(adapters.adapter_slots(model))
  problems = [f"no adapter at {p} for " + ", ".join(arrays[p].sources or (p,))
              for p in sorted(set(arrays) - set(slots))]
  problems += [f"{p}: the model has an adapter here but the checkpoint has none"
               for p in sorted(set(slots) - set(arrays))]
  for path in sorted(set(slots) & set(arrays)):
    for name, _, shape, value in _targets(slots[path].adapter, arrays[path]):
      got = None if value is None else tuple(value.shape)
      if got != tuple(shape):
        src = ", ".join(arrays[path].sources) or path
        problems.append(f"{path}/{name} (from {src}): checkpoint {got}, model expects "
                        f"{tuple(shape)}")
  raise_problems(problems, "adapter tensors do not fit the model")
  mapped = {}
  for path in sorted(arrays):
    adapter = slots[path].adapter
    for name, var, _, value in _targets(adapter, arrays[path]):
      if var is None:  # routing logits: frozen rows first
        router = adapter.router
        n_frozen = 0
        if router.frozen_router_logits is not None:
          n_frozen = router.frozen_router_logits.shape[0]
          router.frozen_router_logits[...] = jnp.asarray(
              value[:n_frozen], router.frozen_router_logits.dtype)
        router.router_logits[...] = jnp.asarray(value[n_frozen:], router.router_logits.dtype)
      else:
        var[...] = jnp.asarray(value, var.dtype)
    for src, name in zip(arrays[path].sources, ("lora_a", "lora_b", "router_logits")):
      mapped[src] = f"{path}/adapter/{name}"
  return mapped


def _mixed(adapter: adapters.RoutedLoRA, task_id: int) -> tuple[np.ndarray, np.ndarray]:
  """One task's routed adapter as a plain LoRA: A (D, r), B (r, O), noiseless routing."""
  w = adapter.router.task_weights(task_id)  # (S, K)
  a, b = routing.mix(w[None], adapter.lora_a[...].astype(jnp.float32),
                     adapter.lora_b[...].astype(jnp.float32))
  a = a[0].reshape(adapter.in_dim, adapter.lora_rank)  # (1, S, D/S, r) -> (D, r)
  b = jnp.transpose(b[0], (1, 0, 2))  # (S, r, O/S) -> (r, S, O/S)
  b = b.reshape(adapter.lora_rank, adapter.out_dim)  # (r, S, O/S) -> (r, O)
  return np.asarray(a), np.asarray(b)


def extract(model: nnx.Module, *, task_id: Optional[int] = None
            ) -> tuple[dict[str, LayerArrays], float]:
  """The adapters of ``model`` as ``({layer path: LayerArrays}, scale alpha / r)``.

  Routed adapters come out routed, unless ``task_id`` is given: then each is mixed with that
  task's noiseless routing weights into one plain LoRA, which equals the routed adapter on that
  task exactly (A and B are mixed separately, algorithm.md section 3). Plain LoRA adapters
  (``lora``, ``mhr_mu``) come out as they are.
  """
  out, scales = {}, set()
  for path, layer in adapters.adapter_slots(model):
    ad = layer.adapter
    scales.add(float(ad.scale))
    if isinstance(ad, adapters.RoutedLoRA) and task_id is None:
      out[path] = LayerArrays(np.asarray(ad.lora_a[...], np.float32),
                              np.asarray(ad.lora_b[...], np.float32),
                              np.asarray(ad.router.logits(), np.float32))
    elif isinstance(ad, adapters.RoutedLoRA):
      out[path] = LayerArrays(*_mixed(ad, task_id))
    else:
      out[path] = LayerArrays(np.asarray(ad.lora_a[...], np.float32),
                              np.asarray(ad.lora_b[...], np.float32))
  if not out:
    raise errors.ConfigError("the model has no adapters to export")
  if len(scales) > 1:
    raise errors.ConfigError(
        f"adapters with different scales {sorted(scales)}: one alpha / r per file")
  return out, scales.pop()
