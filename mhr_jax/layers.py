"""T5 building blocks in Flax NNX, each dense layer with an optional adapter slot.

The slot is the only place the backbone knows about adapters: a dense layer built with an
``adapter`` adds ``adapter(x, task_ids, deterministic=...)`` to its output. Adapters are built by an
``AdapterFactory`` handed to the network at construction, which sees the layer's path
(for example ``"encoder/layers_0/attention/q"``) and decides whether to put one there.
With no factory (or a factory that returns None everywhere) the network is plain T5.

Activations are constrained where t5x constrains them (``sharding.constrain``, a no-op unless a
step is traced under ``sharding.activation_rules``): queries, keys, values and the attention
output by (batch, length, heads, kv), the MLP's hidden activations by (batch, length, mlp), the
embedded tokens (and, in ``network``, every layer's input) by (batch, length, embed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from mhr_jax import axes
from mhr_jax.sharding import constrain

Array = jax.Array
DType = jnp.dtype


class Adapter(Protocol):
  """What a dense layer's adapter slot accepts.

  ``__call__`` returns the additive change to the layer's output, shaped like the output.
  ``delta_kernel`` returns, for one task, the (in_dim, out_dim) matrix that folds the adapter
  into the dense kernel (used for merging into a plain T5).
  """

  def __call__(self, x: Array, task_ids: Optional[Array], *, deterministic: bool) -> Array:
    ...

  def delta_kernel(self, task_id: int) -> Array:
    ...


# Logical axes of activations (t5x's names): per-head projections, MLP hidden, residual stream.
HEADS = (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.KV)
MLP_HIDDEN = (axes.BATCH, axes.LENGTH, axes.ACT_MLP)
EMBEDDED = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)

# (path, in_dim, out_dim, rngs) -> adapter, or None for no adapter at that path.
AdapterFactory = Callable[[str, int, int, nnx.Rngs], Optional[Adapter]]


def no_adapters(path: str, in_dim: int, out_dim: int, rngs: nnx.Rngs) -> None:
  del path, in_dim, out_dim, rngs
  return None


def param(init_fn, key, shape, param_dtype, logical_axes) -> nnx.Param:
  """A parameter with its logical axis names attached as metadata."""
  if len(shape) != len(logical_axes):
    raise ValueError(f"shape {shape} and logical axes {logical_axes} differ in rank")
  return nnx.Param(init_fn(key, shape, param_dtype), logical_axes=tuple(logical_axes))


def _einsum_f32(spec: str, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def accumulating_einsum(spec: str, a: Array, b: Array) -> Array:
  """``einsum(spec, a, b)`` of two same-dtype operands, accumulated and returned in float32 (
  ``preferred_element_type``), then cast back to the operands' dtype; its backward pass does the
  same for both operand gradients (a bfloat16 cotangent in, bfloat16 operands, float32 out).

  Plain autodiff of a float32-output dot would hand the transposed dots a float32 cotangent
  and a bfloat16 operand, which XLA runs as float32 dots. Every index of an operand must appear
  in the other operand or the output (no index summed within one operand).
  """
  return _einsum_f32(spec, a, b).astype(a.dtype)


def _accumulating_einsum_fwd(spec, a, b):
  return accumulating_einsum(spec, a, b), (a, b)


def _accumulating_einsum_bwd(spec, res, g):
  a, b = res
  operands, out = spec.split("->")
  sa, sb = operands.split(",")
  # d/da: [out] x [b] -> [a]; d/db: [out] x [a] -> [b] (each a plain einsum of the cotangent).
  da = _einsum_f32(f"{out},{sb}->{sa}", g.astype(a.dtype), b).astype(a.dtype)
  db = _einsum_f32(f"{out},{sa}->{sb}", g.astype(b.dtype), a).astype(b.dtype)
  return da, db


accumulating_einsum.defvjp(_accumulating_einsum_fwd, _accumulating_einsum_bwd)


@dataclasses.dataclass(frozen=True)
class Precision:
  """Compute dtype for activations and matmuls, storage dtype for parameters.

  ``f32_accumulation``: with a compute dtype below float32, the dense layers' matmuls (every
  projection, the MLP and the output head) accumulate and return float32
  (``accumulating_einsum``, forward and backward) before the cast back to the compute dtype. On
  XLA:CPU this is what runs bfloat16 matmuls on the CPU's bfloat16 dot units (about 2x
  float32's rate with avx512_bf16, docs/bf16_cpu.md); a bfloat16-output dot runs as a float32
  dot there. On accelerators the matmul units accumulate in float32 either way. The attention's
  batched einsums stay as they are: XLA:CPU (jaxlib 0.10) leaves some of their backward dots to
  its own dot kernel, which has no bfloat16 x bfloat16 -> float32 form (UNIMPLEMENTED at run
  time). False: plain dots in the compute dtype.
  """

  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  f32_accumulation: bool = True

  def einsum(self, spec: str, a: Array, b: Array) -> Array:
    """``einsum(spec, a, b)`` of two operands already in the compute dtype."""
    if self.f32_accumulation and jnp.dtype(self.dtype).itemsize < 4:
      return accumulating_einsum(spec, a, b)
    return jnp.einsum(spec, a, b)


class Dense(nnx.Module):
  """A bias-free linear layer y = x W with an optional adapter slot.

  Kernel shape (in_dim, out_dim), the transpose of PyTorch's ``nn.Linear.weight``.
  """

  def __init__(
      self,
      in_dim: int,
      out_dim: int,
      kernel_axes: tuple[str, str],
      *,
      precision: Precision,
      init_std: float,
      rngs: nnx.Rngs,
      adapter: Optional[Adapter] = None,
  ):
    init = jax.nn.initializers.normal(init_std)
    self.kernel = param(init, rngs.params(), (in_dim, out_dim), precision.param_dtype, kernel_axes)
    self.adapter = adapter
    self.dtype = precision.dtype
    self.precision = precision
    self.in_dim = in_dim
    self.out_dim = out_dim

  def __call__(self, x: Array, task_ids: Optional[Array] = None, *, deterministic: bool = True):
    x = x.astype(self.dtype)
    # [..., D] x [D, O] -> [..., O]
    y = self.precision.einsum("...d,do->...o", x, self.kernel[...].astype(self.dtype))
    if self.adapter is not None:
      y = y + self.adapter(x, task_ids, deterministic=deterministic).astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding; also the tied output projection of T5 v1.0."""

  def __init__(self, vocab_size: int, embed_dim: int, *, precision: Precision, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(1.0)
    self.embedding = param(
        init, rngs.params(), (vocab_size, embed_dim), precision.param_dtype,
        (axes.VOCAB, axes.EMBED))
    self.dtype = precision.dtype

  def __call__(self, tokens: Array) -> Array:
    # [B, L] -> [B, L, E]
    return constrain(jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype), EMBEDDED)

  def attend(self, x: Array) -> Array:
    # [B, L, E] x [V, E] -> [B, L, V]
    return jnp.einsum("ble,ve->blv", x, self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

  def __init__(self, dim: int, *, eps: float, precision: Precision):
    self.scale = nnx.Param(jnp.ones((dim,), precision.param_dtype), logical_axes=(axes.EMBED,))
    self.eps = eps
    self.dtype = precision.dtype

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
  """T5's bucketing of (key - query) offsets: exact for small offsets, log-spaced up to max_distance."""
  ret = jnp.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # Float math as in the reference implementations; the int cast truncates towards zero.
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps)
      / math.log(max_distance / max_exact)
      * (num_buckets - max_exact)
  ).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nnx.Module):
  """Learned per-head bias indexed by relative-position bucket, shared by all layers of a stack."""

  def __init__(
      self, num_buckets: int, max_distance: int, num_heads: int, *, bidirectional: bool,
      precision: Precision, rngs: nnx.Rngs,
  ):
    init = jax.nn.initializers.normal(1.0)
    self.rel_embedding = param(
        init, rngs.params(), (num_buckets, num_heads), precision.param_dtype,
        (axes.RELPOS_BUCKETS, axes.HEADS))
    self.num_buckets = num_buckets
    self.max_distance = max_distance
    self.bidirectional = bidirectional
    self.dtype = precision.dtype

  def __call__(self, q_len: int, k_len: int, q_offset: int = 0) -> Array:
    """Returns the bias [1, H, q_len, k_len]; ``q_offset`` is the position of the first query."""
    context = jnp.arange(q_len, dtype=jnp.int32)[:, None] + q_offset
    memory = jnp.arange(k_len, dtype=jnp.int32)[None, :]
    buckets = relative_position_bucket(
        memory - context, bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)
    # [q, k] -> [q, k, H] -> [1, H, q, k]
    values = jnp.take(self.rel_embedding[...], buckets, axis=0)
    return jnp.transpose(values, (2, 0, 1))[None].astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class LayerDims:
  d_model: int
  d_kv: int
  num_heads: int
  d_ff: int
  gated: bool  # gated-GELU FFN (T5 v1.1) instead of ReLU (T5 v1.0)
  dropout_rate: float
  layer_norm_eps: float


class Attention(nnx.Module):
  """Multi-head attention without the 1/sqrt(d) scaling (T5 folds it into the init)."""

  def __init__(
      self, path: str, dims: LayerDims, *, precision: Precision, rngs: nnx.Rngs,
      adapter_factory: AdapterFactory,
  ):
    inner = dims.num_heads * dims.d_kv
    d = dims.d_model
    # Initialisation as in the T5 / mesh-tensorflow reference.
    q_std = (d * dims.d_kv) ** -0.5
    kv_std = d ** -0.5
    o_std = inner ** -0.5

    def dense(name, din, dout, kaxes, std):
      return Dense(
          din, dout, kaxes, precision=precision, init_std=std, rngs=rngs,
          adapter=adapter_factory(f"{path}/{name}", din, dout, rngs))

    self.q = dense("q", d, inner, (axes.EMBED, axes.JOINED_KV), q_std)
    self.k = dense("k", d, inner, (axes.EMBED, axes.JOINED_KV), kv_std)
    self.v = dense("v", d, inner, (axes.EMBED, axes.JOINED_KV), kv_std)
    self.o = dense("o", inner, d, (axes.JOINED_KV, axes.EMBED), o_std)
    self.dropout = nnx.Dropout(dims.dropout_rate, rngs=rngs)
    self.num_heads = dims.num_heads
    self.d_kv = dims.d_kv
    self.dtype = precision.dtype

  def __call__(
      self, x_q: Array, x_kv: Array, bias: Array, task_ids: Optional[Array], *,
      deterministic: bool,
  ) -> Array:
    """x_q [B, Lq, E], x_kv [B, Lk, E], bias [B or 1, H or 1, Lq, Lk] (mask folded in)."""
    b, lq, _ = x_q.shape
    lk = x_kv.shape[1]
    kw = dict(deterministic=deterministic)
    # [B, L, H*K] -> [B, L, H, K]
    q = constrain(self.q(x_q, task_ids, **kw).reshape(b, lq, self.num_heads, self.d_kv), HEADS)
    k = constrain(self.k(x_kv, task_ids, **kw).reshape(b, lk, self.num_heads, self.d_kv), HEADS)
    v = constrain(self.v(x_kv, task_ids, **kw).reshape(b, lk, self.num_heads, self.d_kv), HEADS)
    # [B, Lq, H, K] x [B, Lk, H, K] -> [B, H, Lq, Lk]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores + bias.astype(jnp.float32)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    weights = self.dropout(weights, deterministic=deterministic)
    # [B, H, Lq, Lk] x [B, Lk, H, K] -> [B, Lq, H, K]
    out = constrain(jnp.einsum("bhqk,bkhd->bqhd", weights, v), HEADS)
    # [B, Lq, H, K] -> [B, Lq, H*K]
    return self.o(out.reshape(b, lq, self.num_heads * self.d_kv), task_ids, **kw)


class MLP(nnx.Module):
  """T5 feed-forward block: ReLU (v1.0) or gated GELU (v1.1)."""

  def __init__(
      self, path: str, dims: LayerDims, *, precision: Precision, rngs: nnx.Rngs,
      adapter_factory: AdapterFactory,
  ):
    d, f = dims.d_model, dims.d_ff

    def dense(name, din, dout, kaxes, std):
      return Dense(
          din, dout, kaxes, precision=precision, init_std=std, rngs=rngs,
          adapter=adapter_factory(f"{path}/{name}", din, dout, rngs))

    if dims.gated:
      self.wi_0 = dense("wi_0", d, f, (axes.EMBED, axes.MLP), d ** -0.5)
      self.wi_1 = dense("wi_1", d, f, (axes.EMBED, axes.MLP), d ** -0.5)
    else:
      self.wi = dense("wi", d, f, (axes.EMBED, axes.MLP), d ** -0.5)
    self.wo = dense("wo", f, d, (axes.MLP, axes.EMBED), f ** -0.5)
    self.dropout = nnx.Dropout(dims.dropout_rate, rngs=rngs)
    self.gated = dims.gated

  def __call__(self, x: Array, task_ids: Optional[Array], *, deterministic: bool) -> Array:
    kw = dict(deterministic=deterministic)
    if self.gated:
      h = jax.nn.gelu(self.wi_0(x, task_ids, **kw), approximate=True) * self.wi_1(x, task_ids, **kw)
    else:
      h = jax.nn.relu(self.wi(x, task_ids, **kw))
    h = constrain(self.dropout(h, deterministic=deterministic), MLP_HIDDEN)
    return self.wo(h, task_ids, **kw)
