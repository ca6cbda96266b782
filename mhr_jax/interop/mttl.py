"""The authors' checkpoints (microsoft/mttl) onto our adapters, with a report of what mapped.

mttl wraps each adapted ``transformers`` T5 linear layer in a routed LoRA; a PyTorch Lightning
checkpoint holds ``state_dict`` (keys ``model.<Hugging Face module>.<tensor>``) and
``hyper_parameters``. Per layer (docs/algorithm.md section 8):

  camera-ready (tag ``mhr-camera-ready``, ``mttl/models/adapters.py`` ``SkilledLoRA``)
      ``lora_a`` (S, K, D/S, r), ``lora_b`` (S, K, r, O/S): our layout
  newer (``mttl/models/modifiers/lora.py`` ``SkilledLoRA``, 2024)
      ``lora_a`` (K, S, D/S, r), ``lora_b`` (K, r, S, O/S)
  both  ``selector.module_logits`` (T, S*K), viewed as (T, S, K) (``PolytroponSelector``);
        scale ``lora_alpha / lora_rank``; plain LoRA ``lora_a`` (D, r), ``lora_b`` (r, O)

The layout follows from the shapes (the two differ unless S = K = r); ``layout=`` settles it
otherwise. Layers without ``module_logits`` were trained with mttl's average selector (MHR-mu):
their skills are averaged per split into one LoRA, which is that selector's output exactly.
mttl only saves trainable tensors, so the backbone comes from a Hugging Face checkpoint.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional

import numpy as np
from flax import nnx

from mhr_jax import adapters, errors, hf_import
from mhr_jax.interop import hf_names, slots
from mhr_jax.interop.slots import AdapterImportError, ImportReport, LayerArrays
from mhr_jax.network import T5

LAYOUTS = ("camera_ready", "newer")
_NAMES = ("lora_a", "lora_b", "selector.module_logits")
# mttl routing options whose weights ours cannot reproduce (PolytroponSelector.forward).
_UNSUPPORTED = ("module_logits_l2_norm", "module_logits_straight_through",
                "poly_average_correction", "poly_use_shared_skill")


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def read_checkpoint(checkpoint) -> tuple[dict[str, np.ndarray], dict]:
  """``(state dict as float32 arrays, hyper-parameters)`` of an mttl checkpoint.

  ``checkpoint`` is a Lightning ``.ckpt`` or a torch ``state_dict`` file (read with
  ``torch.load(weights_only=True)``, torch needed), a ``.safetensors`` or ``.npz`` file, or a
  mapping (a state dict, or a Lightning dict with ``state_dict`` and ``hyper_parameters``).
  """
  if not isinstance(checkpoint, Mapping):
    path = pathlib.Path(checkpoint)
    if not path.exists():
      raise errors.MissingFileError(f"{path} not found")
    if path.suffix == ".safetensors":
      from safetensors.numpy import load_file

      checkpoint = load_file(str(path))
    elif path.suffix == ".npz":
      with np.load(path) as f:
        checkpoint = dict(f)
    else:
      try:
        import torch
      except ImportError as e:
        raise ImportError(f"{path}: reading a torch checkpoint needs torch (the 'torch' extra); "
                          "or convert it to .safetensors") from e
      checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
  hparams = dict(checkpoint.get("hyper_parameters") or {})
  state = checkpoint.get("state_dict", checkpoint)
  return {k: _numpy(v) for k, v in state.items() if hasattr(v, "shape")}, hparams


def _fits(layout: str, a: tuple, b: tuple, d_in: int, d_out: int) -> bool:
  """Whether lora_a / lora_b shapes are those of ``layout`` for a (d_in, d_out) layer."""
  if layout == "camera_ready":  # a (S, K, D/S, r), b (S, K, r, O/S)
    s, k, r = a[0], a[1], a[3]
    return a[0] * a[2] == d_in and b == (s, k, r, d_out // s) and d_out % s == 0
  s, k, r = a[1], a[0], a[3]  # newer: a (K, S, D/S, r), b (K, r, S, O/S)
  return a[1] * a[2] == d_in and b == (k, r, s, d_out // s) and d_out % s == 0


def _to_ours(layout: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if layout == "camera_ready":
    return a, b
  # (K, S, D/S, r) -> (S, K, D/S, r); (K, r, S, O/S) -> (S, K, r, O/S)
  return np.transpose(a, (1, 0, 2, 3)), np.transpose(b, (2, 0, 1, 3))


def _averaged(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Uniform weights 1/K (mttl's average selector): one LoRA A (D, r), B (r, O)."""
  s, _, d_split, r = a.shape
  a0 = a.mean(axis=1).reshape(s * d_split, r)  # (S, K, D/S, r) -> (S, D/S, r) -> (D, r)
  b0 = np.transpose(b.mean(axis=1), (1, 0, 2))  # (S, K, r, O/S) -> (S, r, O/S) -> (r, S, O/S)
  return a0, b0.reshape(r, -1)  # (r, S, O/S) -> (r, O)


def _routed(path, parts, dims, layout: str, problems: list[str]):
  """One routed layer in our layout and the layout it was read in, or None (problem noted)."""
  (ka, a), (kb, b) = parts["lora_a"], parts["lora_b"]
  if a.ndim != 4 or b.ndim != 4:
    problems.append(f"{ka} {a.shape}, {kb} {b.shape}: a routed LoRA has 4-d lora_a and lora_b")
    return None
  fits = [lay for lay in LAYOUTS if _fits(lay, a.shape, b.shape, *dims[path])]
  if layout != "auto":
    fits = [lay for lay in fits if lay == layout]
  if len(fits) != 1:
    why = ("fit both layouts (S = K = r): pass layout='camera_ready' or 'newer'" if fits
           else f"fit no {'' if layout == 'auto' else layout + ' '}layout for a "
                f"{dims[path]} layer")
    problems.append(f"{ka} {a.shape}, {kb} {b.shape}: {why}")
    return None
  a, b = _to_ours(fits[0], a, b)
  if "selector.module_logits" in parts:
    kz, z = parts["selector.module_logits"]
    if z.ndim != 2 or z.shape[1] != a.shape[0] * a.shape[1]:
      problems.append(f"{kz}: shape {z.shape}, expected (n_tasks, {a.shape[0] * a.shape[1]})")
      return None
    return LayerArrays(a, b, z, sources=(ka, kb, kz)), fits[0]
  return LayerArrays(*_averaged(a, b), sources=(ka, kb)), fits[0] + ", averaged"


def layer_arrays(
    state: Mapping[str, np.ndarray], dims: Mapping[str, tuple[int, int]], *,
    layout: str = "auto", strict: bool = True,
) -> tuple[dict[str, LayerArrays], str, dict[str, str]]:
  """``({layer path: LayerArrays}, layout read, {skipped tensor: reason})``.

  Args:
    state: the checkpoint's tensors.
    dims: (in, out) features of every adaptable layer (``slots.dense_layers``).
    layout: ``"auto"``, ``"camera_ready"`` or ``"newer"``.
    strict: refuse tensors that are not adapters of adaptable layers (else skip and report them).
  """
  if layout not in ("auto",) + LAYOUTS:
    raise errors.ConfigError(f"layout must be 'auto' or one of {LAYOUTS}; got {layout!r}")
  problems, skipped = [], {}
  grouped: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  for key in sorted(state):
    hit = hf_names.split_key(key)
    if hit is None or hit[1] not in _NAMES or hit[0] not in dims:
      skipped[key] = "not an mttl adapter tensor of an adaptable T5 layer of this model"
      continue
    grouped.setdefault(hit[0], {})[hit[1]] = (key, state[key])
  if strict:
    problems += [f"{k}: {why}" for k, why in skipped.items()]
  out, seen = {}, set()
  for path, parts in sorted(grouped.items()):
    if "lora_a" not in parts or "lora_b" not in parts:
      problems.append(f"{hf_names.to_module(path)}: has {sorted(parts)}, needs lora_a and lora_b")
    elif parts["lora_a"][1].ndim == 2:  # a plain LoRA
      (ka, a), (kb, b) = parts["lora_a"], parts["lora_b"]
      if a.shape[0] != dims[path][0] or b.shape != (a.shape[1], dims[path][1]):
        problems.append(f"{ka} {a.shape}, {kb} {b.shape}: not a LoRA of a {dims[path]} layer")
      else:
        out[path] = LayerArrays(a, b, sources=(ka, kb))
        seen.add("lora")
    else:
      hit = _routed(path, parts, dims, layout, problems)
      if hit is not None:
        out[path] = hit[0]
        seen.add(hit[1])
  if len(seen) > 1:
    problems.append(f"layers were read in different layouts {sorted(seen)}")
  slots.raise_problems(problems, "mttl tensors that cannot be mapped")
  return out, (seen.pop() if seen else "none"), skipped


def _check_hparams(hparams: Mapping[str, Any]) -> None:
  used = [k for k in _UNSUPPORTED if hparams.get(k)]
  if used:
    raise AdapterImportError(f"the checkpoint routes with {used}, which our routers do not do")


def _import(model_or_dims, state, hparams, source, *, layout, strict, lora_alpha):
  """Shared by ``load`` and ``assign_checkpoint``: arrays, adapter config and report."""
  _check_hparams(hparams)
  arrays, read_as, skipped = layer_arrays(state, model_or_dims, layout=layout, strict=strict)
  alpha = lora_alpha if lora_alpha is not None else float(hparams.get("lora_alpha", 1.0))
  mode = "mhr_mu" if read_as.endswith("averaged") else None
  config = slots.adapter_config(arrays, lora_alpha=alpha, mode=mode)
  report = ImportReport(source=str(source), layout=f"mttl {read_as}", skipped=skipped)
  report.notes.append(f"mode {config.mode}, n_splits={config.n_splits}, "
                      f"n_skills={config.n_skills}, rank={config.lora_rank}, "
                      f"n_tasks={config.n_tasks}")
  report.notes.append(f"lora_alpha {alpha} (" + ("given" if lora_alpha is not None else
                      "from the checkpoint's hyper-parameters" if "lora_alpha" in hparams
                      else "mttl's default") + ")")
  if hparams.get("module_logits_relaxed_bernoulli"):
    report.notes.append("trained with relaxed-Bernoulli routing: set "
                        "AdapterConfig.relaxed_bernoulli=True to train it further the same way")
  return arrays, config, report


def load(hf_checkpoint, checkpoint, *, layout: str = "auto", strict: bool = True,
         lora_alpha: Optional[float] = None, rngs: Optional[nnx.Rngs] = None,
         **config_overrides) -> tuple[T5, ImportReport]:
  """Our T5 from a Hugging Face checkpoint with an mttl checkpoint's adapters on it.

  The adapter configuration follows from the tensors (``poly`` / ``mhr`` with routing,
  ``mhr_mu`` without, ``lora`` for plain LoRA); ``lora_alpha`` defaults to the checkpoint's
  hyper-parameter, else mttl's default 1.
  """
  state, hparams = read_checkpoint(checkpoint)
  cfg = hf_import.config_from_hf(hf_import.read_config(hf_checkpoint), **config_overrides)
  abstract = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
  dims = {p: (d.in_dim, d.out_dim) for p, d in slots.dense_layers(abstract).items()}
  source = checkpoint if not isinstance(checkpoint, Mapping) else "state dict"
  arrays, config, report = _import(dims, state, hparams, source, layout=layout, strict=strict,
                                   lora_alpha=lora_alpha)
  model = hf_import.load_t5(hf_checkpoint, adapter_factory=adapters.make_adapter_factory(config),
                            rngs=rngs, **config_overrides)
  report.mapped = slots.assign(model, arrays)
  return model, report


def assign_checkpoint(model: nnx.Module, checkpoint, *, layout: str = "auto",
                      strict: bool = True) -> ImportReport:
  """Writes an mttl checkpoint's adapters into a model built with matching adapters (in place)."""
  state, hparams = read_checkpoint(checkpoint)
  dims = {p: (d.in_dim, d.out_dim) for p, d in slots.dense_layers(model).items()}
  source = checkpoint if not isinstance(checkpoint, Mapping) else "state dict"
  arrays, config, report = _import(dims, state, hparams, source, layout=layout, strict=strict,
                                   lora_alpha=None)
  for path, layer in adapters.adapter_slots(model):
    if not np.isclose(layer.adapter.scale, config.scale):
      raise AdapterImportError(f"{path}: the model's scale {layer.adapter.scale} is not the "
                               f"checkpoint's lora_alpha / r = {config.scale}")
  report.mapped = slots.assign(model, arrays)
  return report
