"""Hugging Face PEFT adapters in and out: Poly / MHR, and plain LoRA.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
(``peft.PeftModel.save_pretrained``); tensors are named after the ``transformers`` module they
wrap, ``base_model.model.<module>.<tensor>``. PEFT's tensors and ours (docs/algorithm.md
section 8; PEFT ``tuners/poly/layer.py`` and ``tuners/lora/layer.py``):

  PEFT Poly  ``poly_lora_A`` (S, K, D/S, r), ``poly_lora_B`` (S, K, r, O/S),
             ``poly_router.module_logits`` (T, S*K); output change (x A) B / r
  PEFT LoRA  ``lora_A.weight`` (r, D), ``lora_B.weight`` (O, r);
             output change (x A^T) B^T * alpha / r
  ours       ``lora_a`` (S, K, D/S, r), ``lora_b`` (S, K, r, O/S), ``router_logits`` (T, S*K);
             plain LoRA ``lora_a`` (D, r), ``lora_b`` (r, O); output change (x A) B * alpha / r

PEFT's Poly router is ours in evaluation (sigmoid, normalised per split), so an imported adapter
gives PEFT's outputs; PEFT always trains with relaxed-Bernoulli noise, which is our
``AdapterConfig.relaxed_bernoulli``. What cannot map (a tensor of a module our T5 has no adapter
slot for, a rank or count other than the config's, LoRA variants such as DoRA or per-module
ranks) is refused, naming every such tensor.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Mapping, Optional

import numpy as np
from flax import nnx

from mhr_jax import adapters, errors, hf_import
from mhr_jax.interop import hf_names, slots
from mhr_jax.interop.slots import AdapterImportError, ImportReport, LayerArrays

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK_TYPE = "SEQ_2_SEQ_LM"
PREFIX = "base_model.model."
_POLY = ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")
_LORA = ("lora_A.weight", "lora_B.weight")
POLY_TYPE = "poly"  # PolyConfig.poly_type: the one router PEFT has


def read_adapter(path) -> tuple[dict, dict[str, np.ndarray]]:
  """``(adapter_config.json as a dict, {tensor name: float32 array})`` of a PEFT adapter folder."""
  from safetensors.numpy import load_file

  path = pathlib.Path(path)
  cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
  if not cfg_file.exists():
    raise errors.MissingFileError(
        f"{cfg_file} not found: a PEFT adapter folder needs {CONFIG_FILE}")
  if not weights.exists():
    other = sorted(p.name for p in path.glob("adapter_model.*"))
    hint = f" (found {other}: re-save it with safe_serialization=True)" if other else ""
    raise errors.MissingFileError(f"{weights} not found{hint}")
  try:
    config = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise errors.CheckpointError(f"{cfg_file}: malformed JSON: {e}") from e
  return config, {k: v.astype(np.float32) for k, v in load_file(str(weights)).items()}


def _group(tensors: Mapping[str, np.ndarray], names: tuple[str, ...], problems: list[str]):
  """{layer path: {tensor kind: (source name, array)}}; unmappable names go to ``problems``."""
  layers: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  for key in sorted(tensors):
    hit = hf_names.split_key(key)
    if hit is None or hit[1] not in names:
      problems.append(f"{key}: not a {' / '.join(names)} tensor of a T5 attention (q, k, v, o) "
                      "or MLP (wi, wi_0, wi_1, wo) layer, where our adapters sit")
      continue
    layers.setdefault(hit[0], {})[hit[1]] = (key, tensors[key])
  for path, parts in sorted(layers.items()):
    missing = [n for n in names if n not in parts]
    if missing:
      problems.append(f"{hf_names.to_module(path)}: has {sorted(parts)} but not {missing}")
  return layers


def _check_shape(key: str, arr: np.ndarray, want: tuple, what: str, problems: list[str]) -> None:
  """``want`` holds ints or None (any size) per dimension."""
  if arr.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, arr.shape)):
    shown = tuple("*" if w is None else w for w in want)
    problems.append(f"{key}: shape {tuple(arr.shape)}, {what} expects {shown}")


def _poly_arrays(config: Mapping, tensors: Mapping[str, np.ndarray]) -> dict[str, LayerArrays]:
  if config.get("poly_type", POLY_TYPE) != POLY_TYPE:
    raise AdapterImportError(f"poly_type {config['poly_type']!r}: only 'poly' is known")
  r, t, k, s = (int(config[f]) for f in ("r", "n_tasks", "n_skills", "n_splits"))
  problems: list[str] = []
  layers = _group(tensors, _POLY, problems)
  what = f"the config (r={r}, n_tasks={t}, n_skills={k}, n_splits={s})"
  out = {}
  for path, parts in layers.items():
    if len(parts) != len(_POLY):
      continue
    (ka, a), (kb, b), (kz, z) = (parts[n] for n in _POLY)
    _check_shape(ka, a, (s, k, None, r), what, problems)
    _check_shape(kb, b, (s, k, r, None), what, problems)
    _check_shape(kz, z, (t, s * k), what, problems)
    out[path] = LayerArrays(a, b, z, sources=(ka, kb, kz))
  slots.raise_problems(problems, "PEFT Poly tensors that cannot be mapped")
  return out


def _lora_arrays(config: Mapping, tensors: Mapping[str, np.ndarray]) -> dict[str, LayerArrays]:
  options = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save")
  unsupported = {k: config[k] for k in options if config.get(k)}
  if config.get("bias", "none") != "none":
    unsupported["bias"] = config["bias"]
  if config.get("fan_in_fan_out"):
    unsupported["fan_in_fan_out"] = True
  if unsupported:
    raise AdapterImportError(f"LoRA options our adapters do not have: {unsupported}")
  r = int(config["r"])
  problems: list[str] = []
  layers = _group(tensors, _LORA, problems)
  out = {}
  for path, parts in layers.items():
    if len(parts) != len(_LORA):
      continue
    (ka, a), (kb, b) = (parts[n] for n in _LORA)
    _check_shape(ka, a, (r, None), f"the config (r={r})", problems)
    _check_shape(kb, b, (None, r), f"the config (r={r})", problems)
    out[path] = LayerArrays(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T),
                            sources=(ka, kb))  # (r, D) -> (D, r); (O, r) -> (r, O)
  slots.raise_problems(problems, "PEFT LoRA tensors that cannot be mapped")
  return out


def adapter_arrays(config: Mapping, tensors: Mapping[str, np.ndarray]
                   ) -> tuple[dict[str, LayerArrays], float]:
  """``({layer path: LayerArrays}, lora_alpha)`` of a PEFT Poly or LoRA adapter, checked."""
  kind = config.get("peft_type")
  if kind == "POLY":
    return _poly_arrays(config, tensors), 1.0  # PEFT's Poly scales by 1 / r
  if kind == "LORA":
    return _lora_arrays(config, tensors), float(config.get("lora_alpha", 8))
  raise AdapterImportError(f"peft_type {kind!r}: only POLY and LORA adapters map onto ours")


def _report(path, config, mapped: dict[str, str]) -> ImportReport:
  layout = f"PEFT {config.get('peft_type')}, r={config.get('r')}"
  if config.get("peft_type") == "POLY":
    layout += f", n_splits={config['n_splits']}, n_skills={config['n_skills']}, " \
              f"n_tasks={config['n_tasks']}"
  return ImportReport(source=str(path), layout=layout, mapped=mapped)


def load(hf_checkpoint, adapter_dir, *, mode: Optional[str] = None,
         rngs: Optional[nnx.Rngs] = None, **config_overrides) -> tuple[nnx.Module, ImportReport]:
  """Our T5 from a Hugging Face checkpoint with a PEFT adapter on it, and what was mapped.

  The adapter configuration (mode ``poly`` or ``mhr`` for Poly, ``lora`` for LoRA unless ``mode``
  says otherwise, e.g. ``mhr_mu``) follows from the tensors; adapters sit exactly where the file
  has them.
  """
  config, tensors = read_adapter(adapter_dir)
  arrays, alpha = adapter_arrays(config, tensors)
  adapter_cfg = slots.adapter_config(arrays, lora_alpha=alpha, mode=mode)
  model = hf_import.load_t5(hf_checkpoint, adapter_factory=adapters.make_adapter_factory(
      adapter_cfg), rngs=rngs, **config_overrides)
  return model, _report(adapter_dir, config, slots.assign(model, arrays))


def assign_adapter(model: nnx.Module, adapter_dir) -> ImportReport:
  """Writes a PEFT adapter into a model built with matching adapters (in place).

  The model's scale alpha / r must be PEFT's (1 / r for Poly, lora_alpha / r for LoRA).
  """
  config, tensors = read_adapter(adapter_dir)
  arrays, alpha = adapter_arrays(config, tensors)
  for path, layer in adapters.adapter_slots(model):
    rank = layer.adapter.lora_rank
    if not np.isclose(layer.adapter.scale, alpha / rank):
      raise AdapterImportError(f"{path}: the model's scale {layer.adapter.scale} is not the "
                               f"adapter's alpha / r = {alpha} / {rank}")
  return _report(adapter_dir, config, slots.assign(model, arrays))


# ---------------------------------------------------------------------------------------------
# Export.


def target_modules(model: nnx.Module, paths) -> list[str] | str:
  """PEFT's ``target_modules`` that selects exactly ``paths`` in the Hugging Face T5: the layer
  names when every layer of those names is adapted, else a regex over module names."""
  paths = set(paths)
  leaves = {hf_names.leaf(p) for p in paths}
  if {p for p in slots.dense_layers(model) if hf_names.leaf(p) in leaves} == paths:
    return sorted(leaves)
  return "(" + "|".join(re.escape(hf_names.to_module(p)) for p in sorted(paths)) + ")"


def _write(path, config: dict, tensors: dict[str, np.ndarray]) -> pathlib.Path:
  from safetensors.numpy import save_file

  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            str(path / WEIGHTS_FILE), metadata={"format": "pt"})
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
  return path


def _common_config(peft_type: str, r: int, targets, base: Optional[str]) -> dict:
  return {"peft_type": peft_type, "task_type": TASK_TYPE, "r": r, "target_modules": targets,
          "base_model_name_or_path": base, "inference_mode": True, "modules_to_save": None,
          "exclude_modules": None, "revision": None, "auto_mapping": None}


def save_poly(model: nnx.Module, path, *, base_model_name_or_path: Optional[str] = None
              ) -> pathlib.Path:
  """Writes the routed (Poly / MHR) adapters of ``model`` as a PEFT Poly adapter folder.

  ``peft.PeftModel.from_pretrained(hf_t5, path)`` then gives our outputs for every task (in eval
  mode). PEFT scales by 1 / r: another alpha is folded into ``poly_lora_B``.
  """
  arrays, scale = slots.extract(model)
  if not all(a.routed for a in arrays.values()):
    raise errors.ConfigError("save_poly writes routed (poly / mhr) adapters; this model has plain "
                             "LoRA adapters: use save_lora")
  cfg = slots.adapter_config(arrays)
  fold = scale * cfg.lora_rank  # PEFT multiplies by 1 / r; we by alpha / r
  tensors = {}
  for p, a in arrays.items():
    module = PREFIX + hf_names.to_module(p)
    tensors[f"{module}.poly_lora_A"] = a.lora_a
    tensors[f"{module}.poly_lora_B"] = a.lora_b * fold
    tensors[f"{module}.poly_router.module_logits"] = a.router_logits
  config = _common_config("POLY", cfg.lora_rank, target_modules(model, arrays),
                          base_model_name_or_path)
  config.update(poly_type=POLY_TYPE, n_tasks=cfg.n_tasks, n_skills=cfg.n_skills,
                n_splits=cfg.n_splits, init_weights=True)
  return _write(path, config, tensors)


def save_lora(model: nnx.Module, path, *, task_id: Optional[int] = None,
              base_model_name_or_path: Optional[str] = None) -> pathlib.Path:
  """Writes plain LoRA adapters as a PEFT LoRA adapter folder.

  For ``lora`` and ``mhr_mu`` models the adapters as they are; for routed models one task's
  adapter (``task_id``), mixed with its routing weights into one LoRA per layer, which equals the
  routed model on that task.
  """
  arrays, scale = slots.extract(model, task_id=task_id)
  if any(a.routed for a in arrays.values()):
    raise errors.ConfigError("the model's adapters are routed: pass task_id to export one task's "
                             "adapter as LoRA, or use save_poly for every task")
  rank = slots.adapter_config(arrays).lora_rank
  tensors = {}
  for p, a in arrays.items():
    module = PREFIX + hf_names.to_module(p)
    tensors[f"{module}.lora_A.weight"] = a.lora_a.T  # (D, r) -> (r, D)
    tensors[f"{module}.lora_B.weight"] = a.lora_b.T  # (r, O) -> (O, r)
  config = _common_config("LORA", rank, target_modules(model, arrays), base_model_name_or_path)
  config.update(lora_alpha=scale * rank, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                use_rslora=False, use_dora=False, init_lora_weights=True, rank_pattern={},
                alpha_pattern={}, layers_to_transform=None, layers_pattern=None)
  return _write(path, config, tensors)
