"""Hugging Face T5 checkpoints (``config.json`` + safetensors) to and from our parameters.

Reads the single-file (``model.safetensors``) and the sharded (``model.safetensors.index.json``)
layouts. Only the backbone is mapped: on import, adapter parameters (anything under an ``adapter``
slot) are left as the model initialised them; ``save_hf`` refuses a model that has adapters (merge
them with ``adapters.merge``, or write them with ``mhr_jax.interop.peft``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhr_jax import errors
from mhr_jax.errors import CheckpointMismatchError
from mhr_jax.layers import AdapterFactory, Dense
from mhr_jax.network import T5, T5Config

_CONFIG_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
    "layer_norm_epsilon", "feed_forward_proj")

# Tensors that a checkpoint may carry as copies of ``shared.weight``.
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def config_from_hf(hf: Mapping, **overrides) -> T5Config:
  """Our config from a Hugging Face ``config.json`` dict.

  ``tie_word_embeddings`` false means an untied ``lm_head`` (T5 v1.1). Older configs tie the
  output rescale to tying; newer ones write ``scale_decoder_outputs`` explicitly.
  """
  kwargs = {k: hf[k] for k in _CONFIG_FIELDS if k in hf}
  ffp = kwargs.get("feed_forward_proj", "relu")
  if ffp == "gated-gelu" or ffp == "gated-gelu_new":
    kwargs["feed_forward_proj"] = "gated-gelu"
  elif ffp != "relu":
    raise errors.CheckpointError(
        f"unsupported feed_forward_proj {ffp!r} in T5 config (relu, gated-gelu)")
  tied = bool(hf.get("tie_word_embeddings", True))
  kwargs["tie_word_embeddings"] = tied
  kwargs["scale_decoder_outputs"] = bool(hf.get("scale_decoder_outputs", tied))
  kwargs.update(overrides)
  return T5Config(**kwargs)


def config_to_hf(cfg: T5Config) -> dict:
  out = {k: getattr(cfg, k) for k in _CONFIG_FIELDS}
  out["num_decoder_layers"] = cfg.n_decoder_layers
  out.update(
      model_type="t5", architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True,
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
      tie_word_embeddings=cfg.tie_word_embeddings,
      scale_decoder_outputs=cfg.scale_decoder_outputs)
  return out


def param_map(cfg: T5Config) -> Iterator[tuple[tuple[str, ...], str, bool]]:
  """Yields (our parameter path, Hugging Face name, transpose?) for every backbone tensor."""
  yield ("token_embedder", "embedding"), "shared.weight", False
  gated = cfg.feed_forward_proj == "gated-gelu"
  mlp_names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.n_decoder_layers)):
    hf_stack = stack
    yield ((stack, "relpos_bias", "rel_embedding"),
           f"{hf_stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False)
    for i in range(n_layers):
      ours = (stack, f"layers_{i}")
      blk = f"{hf_stack}.block.{i}.layer"
      if stack == "encoder":
        attn = [("attention", f"{blk}.0.SelfAttention", "pre_attention_layer_norm", f"{blk}.0")]
        mlp_idx = 1
      else:
        attn = [("self_attention", f"{blk}.0.SelfAttention", "pre_self_attention_layer_norm",
                 f"{blk}.0"),
                ("encoder_decoder_attention", f"{blk}.1.EncDecAttention",
                 "pre_cross_attention_layer_norm", f"{blk}.1")]
        mlp_idx = 2
      for name, hf_attn, norm, hf_norm in attn:
        for proj in ("q", "k", "v", "o"):
          yield ours + (name, proj, "kernel"), f"{hf_attn}.{proj}.weight", True
        yield ours + (norm, "scale"), f"{hf_norm}.layer_norm.weight", False
      for proj in mlp_names:
        yield ours + ("mlp", proj, "kernel"), f"{blk}.{mlp_idx}.DenseReluDense.{proj}.weight", True
      yield ours + ("pre_mlp_layer_norm", "scale"), f"{blk}.{mlp_idx}.layer_norm.weight", False
    norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
    yield (stack, norm, "scale"), f"{hf_stack}.final_layer_norm.weight", False
  if not cfg.tie_word_embeddings:
    yield ("decoder", "logits_dense", "kernel"), "lm_head.weight", True


def read_safetensors_dir(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as float32 numpy arrays, by Hugging Face name."""
  from safetensors import safe_open  # local import: only needed here

  path = pathlib.Path(path)
  index = path / "model.safetensors.index.json"
  single = path / "model.safetensors"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise errors.CheckpointError(
          f"{index}: not a safetensors index (need a 'weight_map'): {e}") from e
    files = sorted(set(weight_map.values()))
  elif single.exists():
    files = [single.name]
  else:
    raise errors.MissingFileError(
        f"no model.safetensors or model.safetensors.index.json in {path}")
  tensors = {}
  for fname in files:
    fpath = path / fname
    if not fpath.exists():
      raise errors.MissingFileError(f"{fpath}: shard named by {index.name} is missing")
    with safe_open(str(fpath), framework="numpy") as f:
      for key in f.keys():
        arr = f.get_tensor(key)
        tensors[key] = arr.astype(np.float32) if arr.dtype != np.float32 else arr
  return tensors


def read_config(path: str | pathlib.Path) -> dict:
  cfg_path = pathlib.Path(path) / "config.json"
  if not cfg_path.exists():
    raise errors.MissingFileError(
        f"{cfg_path} not found: a Hugging Face T5 directory needs config.json")
  try:
    return json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise errors.CheckpointError(f"{cfg_path}: malformed JSON: {e}") from e


def hf_to_params(cfg: T5Config, tensors: Mapping[str, np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
  """Maps Hugging Face tensors to our flat parameter paths, checking names and shapes.

  Raises:
    CheckpointMismatchError: naming every missing, unexpected and mis-shaped tensor.
  """
  expected = _expected_shapes(cfg)
  out, missing, bad_shape = {}, [], []
  used = set()
  for ours, hf_name, transpose in param_map(cfg):
    if hf_name not in tensors:
      missing.append(hf_name)
      continue
    used.add(hf_name)
    arr = np.asarray(tensors[hf_name])
    arr = arr.T if transpose else arr
    if arr.shape != expected[ours]:
      want = expected[ours][::-1] if transpose else expected[ours]
      got = arr.shape[::-1] if transpose else arr.shape
      bad_shape.append(f"{hf_name}: checkpoint {tuple(got)}, model expects {tuple(want)}")
      continue
    out[ours] = arr
  optional = set(_EMBED_COPIES)
  if cfg.tie_word_embeddings:
    optional.add("lm_head.weight")
  unexpected = sorted(k for k in tensors if k not in used and k not in optional)
  if missing or unexpected or bad_shape:
    lines = []
    if missing:
      lines.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      lines.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if bad_shape:
      lines.append(f"wrong shape ({len(bad_shape)}): " + "; ".join(bad_shape))
    raise CheckpointMismatchError("checkpoint does not match the T5 config:\n  " + "\n  ".join(lines))
  return out


def _expected_shapes(cfg: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  abstract = nnx.eval_shape(lambda: T5(cfg.replace(dtype="float32"), rngs=nnx.Rngs(0)))
  return {path: tuple(v.shape) for path, v in backbone_params(abstract).items()}


def backbone_params(model: nnx.Module) -> dict[tuple[str, ...], nnx.Variable]:
  """Flat {path: Param} of the backbone, excluding anything inside an adapter slot."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {tuple(str(p) for p in path): var for path, var in flat if "adapter" not in path}


def assign_backbone(model: T5, params: Mapping[tuple[str, ...], np.ndarray]) -> None:
  """Writes backbone arrays into ``model`` in place (cast to each parameter's dtype)."""
  targets = backbone_params(model)
  missing = sorted("/".join(p) for p in targets if p not in params)
  unexpected = sorted("/".join(p) for p in params if p not in targets)
  if missing or unexpected:
    raise CheckpointMismatchError(
        f"parameters do not match the model: missing {missing}, unexpected {unexpected}")
  for path, var in targets.items():
    arr = params[path]
    if tuple(arr.shape) != tuple(var.shape):
      raise CheckpointMismatchError(
          f"{'/'.join(path)}: got shape {arr.shape}, model expects {var.shape}")
    value = np.asarray(arr, dtype=var.dtype)
    # A model built sharded keeps its layout: each device receives only its shards.
    sharding = getattr(var[...], "sharding", None)
    var[...] = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


def load_t5(
    path: str | pathlib.Path, *, adapter_factory: Optional[AdapterFactory] = None,
    rngs: Optional[nnx.Rngs] = None, **config_overrides,
) -> T5:
  """Builds our T5 from a Hugging Face checkpoint directory (with optional adapters)."""
  hf_cfg = read_config(path)
  cfg = config_from_hf(hf_cfg, **config_overrides)
  params = hf_to_params(cfg, read_safetensors_dir(path))
  model = T5(cfg, rngs=rngs or nnx.Rngs(0), adapter_factory=adapter_factory)
  assign_backbone(model, params)
  return model


def params_to_hf(model: T5) -> dict[str, np.ndarray]:
  """The backbone as Hugging Face tensors (float32), the inverse of ``hf_to_params``."""
  params = backbone_params(model)
  out = {}
  for ours, hf_name, transpose in param_map(model.config):
    arr = np.asarray(params[ours][...], dtype=np.float32)
    out[hf_name] = np.ascontiguousarray(arr.T if transpose else arr)
  return out


def save_hf(model: T5, path: str | pathlib.Path) -> None:
  """Writes ``config.json`` and ``model.safetensors`` that Hugging Face ``transformers`` loads.

  Raises:
    errors.ConfigError: the model has adapters, which a plain T5 checkpoint cannot hold (nothing is
      written): fold one task's adapter in with ``adapters.merge(model, task_id)`` first, or write
      the adapters beside the backbone with ``mhr_jax.interop.peft.save_poly`` / ``save_lora``.
  """
  from safetensors.numpy import save_file

  adapted = ["/".join(str(p) for p in path) for path, node in nnx.iter_graph(model)
             if isinstance(node, Dense) and node.adapter is not None]
  if adapted:
    raise errors.ConfigError(
        f"save_hf writes the backbone only, and the model has {len(adapted)} adapters "
        f"({adapted[0]}, ...) that it would drop: merge one task's adapter in with "
        "adapters.merge(model, task_id), or save the adapters in PEFT's format with "
        "mhr_jax.interop.peft.save_poly / save_lora")
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
  save_file(params_to_hf(model), str(path / "model.safetensors"), metadata={"format": "pt"})
