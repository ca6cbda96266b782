"""T5 encoder-decoder (v1.0 and v1.1 / LM-adapted) in Flax NNX.

``task_ids`` ([B] int32) is an explicit argument of every call and reaches every dense layer's
adapter slot; with no adapters it is ignored. Parameter paths follow the T5X layout
(``encoder/layers_0/attention/q/kernel``, ``decoder/relpos_bias/rel_embedding``, ...). Every
layer's input is constrained by (batch, length, embed) and the logits by (batch, length, vocab),
as in t5x (see ``layers``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mhr_jax import axes
from mhr_jax.layers import (
    EMBEDDED, AdapterFactory, Attention, Dense, Embed, LayerDims, MLP, Precision, RMSNorm,
    RelativePositionBias, no_adapters)
from mhr_jax.sharding import constrain

Array = jax.Array
NEG_INF = -1e10  # added to masked attention scores; large enough for exp() to underflow to 0


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 model; the field names are those of Hugging Face's T5Config."""

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_layers: int = 8
  num_decoder_layers: Optional[int] = None  # defaults to num_layers
  num_heads: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"  # "relu" for T5 v1.0
  tie_word_embeddings: bool = False  # output projection is the token embedding (T5 v1.0)
  scale_decoder_outputs: bool = False  # multiply by d_model**-0.5 before the head (T5 v1.0)
  dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
  param_dtype: str = "float32"
  # Matmuls below float32 accumulate and return float32 before the cast back (layers.Precision).
  f32_accumulation: bool = True

  def __post_init__(self):
    if self.feed_forward_proj not in ("relu", "gated-gelu"):
      raise ValueError(
          f"feed_forward_proj must be 'relu' or 'gated-gelu', got {self.feed_forward_proj!r}")

  @property
  def n_decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @property
  def precision(self) -> Precision:
    return Precision(jnp.dtype(self.dtype), jnp.dtype(self.param_dtype), self.f32_accumulation)

  @property
  def layer_dims(self) -> LayerDims:
    return LayerDims(
        d_model=self.d_model, d_kv=self.d_kv, num_heads=self.num_heads, d_ff=self.d_ff,
        gated=self.feed_forward_proj == "gated-gelu", dropout_rate=self.dropout_rate,
        layer_norm_eps=self.layer_norm_epsilon)

  def replace(self, **kwargs) -> "T5Config":
    return dataclasses.replace(self, **kwargs)


# T5 v1.0 differs from v1.1 in these fields (sizes aside).
T5_V1_0 = dict(feed_forward_proj="relu", tie_word_embeddings=True, scale_decoder_outputs=True)

# Sizes of T5 v1.1 / LM-adapted checkpoints (google/t5-v1_1-*, google/t5-*-lm-adapt), and a tiny
# model for tests and the CPU benchmark.
PRESETS: dict[str, T5Config] = {
    "tiny": T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    "small": T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "large": T5Config(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "xl": T5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


def preset(name: str, **overrides) -> T5Config:
  """A size preset by name, with fields overridden (e.g. ``vocab_size``, ``dtype``)."""
  if name not in PRESETS:
    raise ValueError(f"unknown T5 size preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


class EncoderLayer(nnx.Module):

  def __init__(self, path: str, cfg: T5Config, *, rngs: nnx.Rngs, adapter_factory: AdapterFactory):
    dims, prec = cfg.layer_dims, cfg.precision
    self.pre_attention_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, precision=prec)
    self.attention = Attention(
        f"{path}/attention", dims, precision=prec, rngs=rngs, adapter_factory=adapter_factory)
    self.pre_mlp_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, precision=prec)
    self.mlp = MLP(f"{path}/mlp", dims, precision=prec, rngs=rngs, adapter_factory=adapter_factory)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, x, bias, task_ids, *, deterministic):
    x = constrain(x, EMBEDDED)
    h = self.pre_attention_layer_norm(x)
    h = self.attention(h, h, bias, task_ids, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), task_ids, deterministic=deterministic)
    return x + self.dropout(h, deterministic=deterministic)


class DecoderLayer(nnx.Module):

  def __init__(self, path: str, cfg: T5Config, *, rngs: nnx.Rngs, adapter_factory: AdapterFactory):
    dims, prec = cfg.layer_dims, cfg.precision
    eps = cfg.layer_norm_epsilon
    self.pre_self_attention_layer_norm = RMSNorm(cfg.d_model, eps=eps, precision=prec)
    self.self_attention = Attention(
        f"{path}/self_attention", dims, precision=prec, rngs=rngs, adapter_factory=adapter_factory)
    self.pre_cross_attention_layer_norm = RMSNorm(cfg.d_model, eps=eps, precision=prec)
    self.encoder_decoder_attention = Attention(
        f"{path}/encoder_decoder_attention", dims, precision=prec, rngs=rngs,
        adapter_factory=adapter_factory)
    self.pre_mlp_layer_norm = RMSNorm(cfg.d_model, eps=eps, precision=prec)
    self.mlp = MLP(f"{path}/mlp", dims, precision=prec, rngs=rngs, adapter_factory=adapter_factory)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, y, encoded, self_bias, cross_bias, task_ids, *, deterministic):
    kw = dict(deterministic=deterministic)
    y = constrain(y, EMBEDDED)
    h = self.pre_self_attention_layer_norm(y)
    h = self.self_attention(h, h, self_bias, task_ids, **kw)
    y = y + self.dropout(h, **kw)
    h = self.pre_cross_attention_layer_norm(y)
    h = self.encoder_decoder_attention(h, encoded, cross_bias, task_ids, **kw)
    y = y + self.dropout(h, **kw)
    h = self.mlp(self.pre_mlp_layer_norm(y), task_ids, **kw)
    return y + self.dropout(h, **kw)


def _key_mask_bias(key_mask: Array) -> Array:
  """[B, Lk] bool -> additive bias [B, 1, 1, Lk]."""
  return jnp.where(key_mask, 0.0, NEG_INF)[:, None, None, :].astype(jnp.float32)


class Encoder(nnx.Module):

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, adapter_factory: AdapterFactory):
    self.relpos_bias = RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads,
        bidirectional=True, precision=cfg.precision, rngs=rngs)
    self.num_layers = cfg.num_layers
    for i in range(cfg.num_layers):
      setattr(self, f"layers_{i}", EncoderLayer(
          f"encoder/layers_{i}", cfg, rngs=rngs, adapter_factory=adapter_factory))
    self.encoder_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, precision=cfg.precision)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

  def __call__(self, x: Array, tokens: Array, task_ids, *, deterministic: bool) -> Array:
    """x: embedded tokens [B, L, E]; tokens [B, L] (0 = padding, masked as keys)."""
    length = tokens.shape[1]
    bias = self.relpos_bias(length, length) + _key_mask_bias(tokens > 0)
    x = self.dropout(x, deterministic=deterministic)
    for i in range(self.num_layers):
      x = getattr(self, f"layers_{i}")(x, bias, task_ids, deterministic=deterministic)
    x = self.encoder_norm(x)
    return self.dropout(x, deterministic=deterministic)


class Decoder(nnx.Module):

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, adapter_factory: AdapterFactory):
    self.relpos_bias = RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads,
        bidirectional=False, precision=cfg.precision, rngs=rngs)
    self.num_layers = cfg.n_decoder_layers
    for i in range(self.num_layers):
      setattr(self, f"layers_{i}", DecoderLayer(
          f"decoder/layers_{i}", cfg, rngs=rngs, adapter_factory=adapter_factory))
    self.decoder_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, precision=cfg.precision)
    self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
    if not cfg.tie_word_embeddings:
      # Untied output head (T5 v1.1); std d_model**-0.5 keeps the initial logits O(1).
      self.logits_dense = Dense(
          cfg.d_model, cfg.vocab_size, (axes.EMBED, axes.VOCAB), precision=cfg.precision,
          init_std=cfg.d_model ** -0.5, rngs=rngs)
    self.tied = cfg.tie_word_embeddings
    self.scale = cfg.d_model ** -0.5 if cfg.scale_decoder_outputs else None

  def __call__(
      self, y: Array, encoded: Array, encoder_tokens: Array, task_ids, embedder: Embed, *,
      deterministic: bool,
  ) -> Array:
    """y: embedded decoder inputs [B, Lt, E]; encoded [B, Li, E]. Returns logits [B, Lt, V]."""
    lt = y.shape[1]
    causal = jnp.tril(jnp.ones((lt, lt), dtype=bool))
    self_bias = self.relpos_bias(lt, lt) + jnp.where(causal, 0.0, NEG_INF)[None, None]
    cross_bias = _key_mask_bias(encoder_tokens > 0)
    y = self.dropout(y, deterministic=deterministic)
    for i in range(self.num_layers):
      y = getattr(self, f"layers_{i}")(
          y, encoded, self_bias, cross_bias, task_ids, deterministic=deterministic)
    y = self.decoder_norm(y)
    y = self.dropout(y, deterministic=deterministic)
    if self.scale is not None:
      y = y * self.scale
    logits = embedder.attend(y) if self.tied else self.logits_dense(y)
    return constrain(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))


class T5(nnx.Module):
  """T5 encoder-decoder. With ``adapter_factory`` the dense layers get adapters where it says so."""

  def __init__(
      self, cfg: T5Config, *, rngs: nnx.Rngs, adapter_factory: Optional[AdapterFactory] = None,
  ):
    factory = adapter_factory or no_adapters
    self.config = cfg
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, precision=cfg.precision, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs, adapter_factory=factory)
    self.decoder = Decoder(cfg, rngs=rngs, adapter_factory=factory)

  def encode(self, encoder_input_tokens: Array, task_ids: Optional[Array] = None, *,
             deterministic: bool = True) -> Array:
    """[B, Li] tokens -> [B, Li, E] encoder outputs."""
    x = self.token_embedder(encoder_input_tokens)
    return self.encoder(x, encoder_input_tokens, task_ids, deterministic=deterministic)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             task_ids: Optional[Array] = None, *, deterministic: bool = True) -> Array:
    """Teacher-forced decoder: returns logits [B, Lt, V] (float32)."""
    y = self.token_embedder(decoder_input_tokens)
    logits = self.decoder(
        y, encoded, encoder_input_tokens, task_ids, self.token_embedder,
        deterministic=deterministic)
    return logits.astype(jnp.float32)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               task_ids: Optional[Array] = None, *, deterministic: bool = True) -> Array:
    encoded = self.encode(encoder_input_tokens, task_ids, deterministic=deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, task_ids,
                       deterministic=deterministic)
