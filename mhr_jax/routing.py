"""Routing math of Poly and MHR as pure functions of arrays.

Follows the authors' code for "Multi-Head Adapter Routing for Cross-Task Generalization"
(Caccia et al., NeurIPS 2023; microsoft/mttl, tag ``mhr-camera-ready``,
``mttl/models/modifiers/poly.py``), as written down in ``docs/algorithm.md``:

  logits  Z[task_ids]                 (B, Q, K)     gather one routing row per example
  s       sigmoid(l)  or  relaxed Bernoulli sample  soft on/off value per (split, skill)
  w       s / (sum_k s + 1e-12)       (B, Q, K)     normalised over skills, per split
  A_b     sum_k w A_k                 (B, Q, D/Q, R)
  B_b     sum_k w B_k                 (B, Q, R, O/Q)
  y       (x A_b) B_b * alpha / r     (B, L, O)

Einsum letters as in ``mhr_jax.axes``: T tasks, K skills, Q splits, R rank, B batch, L length,
D input features, O output features. No flax here: modules live in ``mhr_jax.adapters``.

Three exact ways to compute the layer's output change, cheapest first where each applies:

  shared      every example has the same weights (a single-task batch without routing noise):
              mix A and B once, then plain LoRA's low-rank product (``mix_shared``,
              ``shared_delta``);
  parameters  mix A_b and B_b per example, then per-example low-rank products
              (``mix_per_example``, ``low_rank_delta_batched``);
  skills      project x through every skill's A_k, weight the (B, L, Q, K, R) projections, and
              the same for B (``skills_delta``); cheaper than ``parameters`` only for very short
              inputs (a decoding step, L = 1), where mixing B*K full matrices dominates.
``mixed_path`` picks between the last two from a FLOP and byte count of the layer's shapes.

Task ids: JAX gathers clamp out-of-range indices silently. ``check_task_ids`` is the eager guard
for concrete arrays (it raises); inside ``jit`` the ids are traced and cannot raise, so
``gather_logits`` turns the routing row of any out-of-range id into NaN, which makes that
example's outputs (and any loss over them) NaN instead of silently using another task's routing.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Added to the per-split sum before dividing (mttl ``global_vars.EPS``; PEFT ``router.EPS``).
NORM_EPS = 1e-12


def is_concrete(x) -> bool:
  """Whether ``x`` holds values on the host side (not a tracer inside a transformation)."""
  return not isinstance(x, jax.core.Tracer)


def check_task_ids(task_ids, n_tasks: int) -> None:
  """Raises ValueError if any id is outside [0, n_tasks) or ids are not integers of rank 1.

  For use at API boundaries on concrete arrays (NumPy or committed JAX arrays). Traced values
  are skipped: inside ``jit`` the NaN guard of ``gather_logits`` takes over.
  """
  if task_ids is None:
    raise ValueError("task_ids is required by routed adapters (shape [batch], int32); got None")
  if not is_concrete(task_ids):
    return
  ids = np.asarray(task_ids)
  if ids.ndim != 1:
    raise ValueError(f"task_ids must have shape [batch]; got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"task_ids must be integers; got dtype {ids.dtype}")
  bad = np.unique(ids[(ids < 0) | (ids >= n_tasks)])
  if bad.size:
    raise ValueError(
        f"task ids {bad.tolist()} are outside [0, {n_tasks}): this router has {n_tasks} tasks")


def gather_logits(router_logits: Array, task_ids: Array, n_splits: int, n_skills: int) -> Array:
  """One routing row per example, viewed as (B, Q, K); NaN rows for out-of-range ids.

  Args:
    router_logits: Z, shape (T, Q*K), row-major over (Q, K).
    task_ids: shape (B,), integer.
    n_splits: Q.
    n_skills: K.
  """
  n_tasks = router_logits.shape[0]
  if router_logits.shape[1] != n_splits * n_skills:
    raise ValueError(
        f"router logits have {router_logits.shape[1]} columns; expected "
        f"n_splits * n_skills = {n_splits} * {n_skills}")
  task_ids = jnp.asarray(task_ids)
  valid = (task_ids >= 0) & (task_ids < n_tasks)
  safe_ids = jnp.where(valid, task_ids, 0)
  rows = jnp.take(router_logits, safe_ids, axis=0)  # (T, Q*K) -> (B, Q*K)
  rows = jnp.where(valid[:, None], rows, jnp.nan)
  return rows.reshape(task_ids.shape[0], n_splits, n_skills)  # (B, Q*K) -> (B, Q, K)


def sample_uniform(key: Array, shape, dtype=jnp.float32) -> Array:
  """u ~ U(eps, 1 - eps), eps the machine epsilon of ``dtype`` (torch ``clamp_probs``)."""
  eps = jnp.finfo(dtype).eps
  return jax.random.uniform(key, shape, dtype, minval=eps, maxval=1.0 - eps)


def relaxed_bernoulli_from_uniform(logits: Array, u: Array, temperature: float = 1.0) -> Array:
  """Relaxed-Bernoulli (Gumbel-sigmoid) sample for given uniforms u.

  s = sigmoid((l + log u - log(1 - u)) / tau) (Maddison et al. 2017, Jang et al. 2017; as torch's
  ``RelaxedBernoulli.rsample`` used by the authors).
  """
  noise = jnp.log(u) - jnp.log1p(-u)
  return jax.nn.sigmoid((logits + noise.astype(logits.dtype)) / temperature)


def relaxed_bernoulli(key: Array, logits: Array, temperature: float = 1.0) -> Array:
  """Relaxed-Bernoulli sample with fresh noise for every element of ``logits``."""
  u = sample_uniform(key, logits.shape, jnp.float32)
  return relaxed_bernoulli_from_uniform(logits, u, temperature)


def normalize(s: Array, eps: float = NORM_EPS) -> Array:
  """Normalises soft on/off values over skills (last axis), per split: s / (sum_k s + eps)."""
  return s / (jnp.sum(s, axis=-1, keepdims=True) + eps)


def uniform_weights(batch: int, n_splits: int, n_skills: int, dtype=jnp.float32) -> Array:
  """Weights 1/K everywhere, shape (B, Q, K): the average of the skills (MHR-mu)."""
  return jnp.full((batch, n_splits, n_skills), 1.0 / n_skills, dtype)


def routing_weights(
    router_logits: Array,
    task_ids: Array,
    *,
    n_splits: int,
    n_skills: int,
    key: Optional[Array] = None,
    temperature: float = 1.0,
) -> Array:
  """Mixing weights w (B, Q, K) for a batch of task ids.

  ``key`` given: relaxed-Bernoulli noise (training); ``key`` None: the noiseless sigmoid path
  (evaluation, or relaxed Bernoulli off).
  """
  logits = gather_logits(router_logits, task_ids, n_splits, n_skills)
  if key is None:
    s = jax.nn.sigmoid(logits)
  else:
    s = relaxed_bernoulli(key, logits, temperature)
  return normalize(s)


def mix(weights: Array, lora_a: Array, lora_b: Array) -> tuple[Array, Array]:
  """Per-example adapters in parameter space: A and B are mixed separately.

  Args:
    weights: w, shape (B, Q, K), already in the compute dtype.
    lora_a: skill inventory A, shape (Q, K, D/Q, R).
    lora_b: skill inventory B, shape (Q, K, R, O/Q).

  Returns:
    A_b (B, Q, D/Q, R) and B_b (B, Q, R, O/Q).
  """
  # (B, Q, K) x (Q, K, D/Q, R) -> (B, Q, D/Q, R)
  a = jnp.einsum("bqk,qkdr->bqdr", weights, lora_a)
  # (B, Q, K) x (Q, K, R, O/Q) -> (B, Q, R, O/Q)
  b = jnp.einsum("bqk,qkro->bqro", weights, lora_b)
  return a, b


def low_rank_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
  """(x A_b) B_b * scale for per-example split adapters.

  Args:
    x: inputs (B, L, D).
    a: A_b (B, Q, D/Q, R); the splits concatenated along D form the (D, R) matrix.
    b: B_b (B, Q, R, O/Q); the splits concatenated along O form the (R, O) matrix.
    scale: alpha / r.

  Returns:
    The change of the layer's output, (B, L, O).
  """
  bsz, length, d_in = x.shape
  n_splits = a.shape[1]
  xs = x.reshape(bsz, length, n_splits, d_in // n_splits)  # (B, L, D) -> (B, L, Q, D/Q)
  # (B, L, Q, D/Q) x (B, Q, D/Q, R) -> (B, L, R)
  h = jnp.einsum("blqd,bqdr->blr", xs, a)
  # (B, L, R) x (B, Q, R, O/Q) -> (B, L, Q, O/Q)
  y = jnp.einsum("blr,bqro->blqo", h, b)
  y = y.reshape(bsz, length, n_splits * b.shape[-1])  # (B, L, Q, O/Q) -> (B, L, O)
  return y * jnp.asarray(scale, y.dtype)


def delta_kernel(weights: Array, lora_a: Array, lora_b: Array, scale: float) -> Array:
  """The (D, O) matrix A B * scale of one mixed adapter, for folding into a dense kernel.

  Args:
    weights: w for one example, shape (Q, K).
    lora_a: (Q, K, D/Q, R).
    lora_b: (Q, K, R, O/Q).
    scale: alpha / r.
  """
  a_t, b = mix_shared(weights, lora_a, lora_b)
  # (R, D) x (R, O) -> (D, O)
  return jnp.einsum("rd,ro->do", a_t, b) * jnp.asarray(scale, a_t.dtype)


def mix_shared(weights: Array, lora_a: Array, lora_b: Array) -> tuple[Array, Array]:
  """One mixed adapter for weights shared by every example.

  Args:
    weights: w, shape (Q, K).
    lora_a: (Q, K, D/Q, R).
    lora_b: (Q, K, R, O/Q).

  Returns:
    A transposed, (R, D), with the splits concatenated along D, and B (R, O) with them along O
    (the layout of ``shared_delta``).
  """
  rank = lora_a.shape[-1]
  # (Q, K) x (Q, K, D/Q, R) -> (R, Q, D/Q)
  a_t = jnp.einsum("qk,qkdr->rqd", weights, lora_a)
  a_t = a_t.reshape(rank, -1)  # (R, Q, D/Q) -> (R, D)
  # (Q, K) x (Q, K, R, O/Q) -> (R, Q, O/Q)
  b = jnp.einsum("qk,qkro->rqo", weights, lora_b)
  b = b.reshape(rank, -1)  # (R, Q, O/Q) -> (R, O)
  return a_t, b


def mix_per_example(weights: Array, lora_a: Array, lora_b: Array) -> tuple[Array, Array]:
  """``mix`` in the layout of ``low_rank_delta_batched``: A_b^T (B, R, D) and B_b (B, R, O)."""
  bsz = weights.shape[0]
  rank = lora_a.shape[-1]
  # (B, Q, K) x (Q, K, D/Q, R) -> (B, R, Q, D/Q)
  a_t = jnp.einsum("bqk,qkdr->brqd", weights, lora_a)
  a_t = a_t.reshape(bsz, rank, -1)  # (B, R, Q, D/Q) -> (B, R, D)
  # (B, Q, K) x (Q, K, R, O/Q) -> (B, R, Q, O/Q)
  b = jnp.einsum("bqk,qkro->brqo", weights, lora_b)
  b = b.reshape(bsz, rank, -1)  # (B, R, Q, O/Q) -> (B, R, O)
  return a_t, b


def shared_delta(x: Array, a_t: Array, b: Array, scale: float,
                 row_factor: Optional[Array] = None) -> Array:
  """(x A) B * scale with one adapter for every example: plain LoRA's two products.

  A is carried transposed, (R, D), behind an optimization barrier (so that XLA does not fold
  a transpose of a (D, R) matrix back into the product): its gradient then comes out as
  dh^T x, (R, D), which XLA's CPU backend runs several times faster than the x^T dh of a
  (D, R) layout (``docs/bench/layer_forms.py``).

  Args:
    x: inputs (B, L, D).
    a_t: A transposed, (R, D).
    b: B (R, O).
    scale: alpha / r, folded into B rather than applied to the (B, L, O) output.
    row_factor: optional (B,) factor on each example's rank-r projection (the NaN guard of an
      example whose task differs from the one a batch was declared to share).

  Returns:
    The change of the layer's output, (B, L, O).
  """
  bsz, length, d_in = x.shape
  x2 = x.reshape(bsz * length, d_in)  # (B, L, D) -> (B*L, D)
  a_t = jax.lax.optimization_barrier(a_t)
  # (B*L, D) x (R, D) -> (B*L, R)
  h = jnp.einsum("nd,rd->nr", x2, a_t)
  if row_factor is not None:
    h = h * jnp.repeat(row_factor, length)[:, None]
  # (B*L, R) x (R, O) -> (B*L, O)
  y = jnp.einsum("nr,ro->no", h, b * jnp.asarray(scale, b.dtype))
  return y.reshape(bsz, length, -1)  # (B*L, O) -> (B, L, O)


def low_rank_delta_batched(x: Array, a_t: Array, b: Array, scale: float) -> Array:
  """(x_b A_b) B_b * scale per example, with A_b transposed as in ``shared_delta``.

  Args:
    x: inputs (B, L, D).
    a_t: A_b transposed, (B, R, D).
    b: B_b (B, R, O).
    scale: alpha / r, folded into B_b.

  Returns:
    The change of the layer's output, (B, L, O).
  """
  # (B, L, D) x (B, R, D) -> (B, L, R)
  h = jnp.einsum("bld,brd->blr", x, a_t)
  # (B, L, R) x (B, R, O) -> (B, L, O)
  return jnp.einsum("blr,bro->blo", h, b * jnp.asarray(scale, b.dtype))


def skills_delta(x: Array, weights: Array, lora_a: Array, lora_b: Array, scale: float) -> Array:
  """The same output change by projecting through every skill, then weighting.

  Args:
    x: inputs (B, L, D).
    weights: w (B, Q, K).
    lora_a: (Q, K, D/Q, R).
    lora_b: (Q, K, R, O/Q).
    scale: alpha / r.
  """
  bsz, length, d_in = x.shape
  n_splits = lora_a.shape[0]
  xs = x.reshape(bsz, length, n_splits, d_in // n_splits)  # (B, L, D) -> (B, L, Q, D/Q)
  # (B, L, Q, D/Q) x (Q, K, D/Q, R) -> (B, L, Q, K, R): every skill's projection
  hk = jnp.einsum("blqd,qkdr->blqkr", xs, lora_a)
  # (B, L, Q, K, R) x (B, Q, K) -> (B, L, R)
  h = jnp.einsum("blqkr,bqk->blr", hk, weights)
  # (B, L, R) x (B, Q, K) -> (B, L, Q, K, R)
  hw = jnp.einsum("blr,bqk->blqkr", h, weights)
  # (B, L, Q, K, R) x (Q, K, R, O/Q) -> (B, L, Q, O/Q)
  y = jnp.einsum("blqkr,qkro->blqo", hw, lora_b * jnp.asarray(scale, lora_b.dtype))
  return y.reshape(bsz, length, -1)  # (B, L, Q, O/Q) -> (B, L, O)


# FLOPs one byte of memory traffic costs, roughly a CPU's peak FLOP rate over its memory
# bandwidth; it weighs the two counts of ``path_costs`` against each other.
FLOPS_PER_BYTE = 8.0


def path_costs(*, d_in: int, d_out: int, n_skills: int, n_splits: int, rank: int, batch: int,
               length: int, itemsize: int = 4) -> dict[str, float]:
  """Forward cost of the ``parameters`` and ``skills`` paths of a mixed-task batch: FLOPs plus
  ``FLOPS_PER_BYTE`` x the bytes each reads and writes (inventory, intermediates, x and y)."""
  d, o, k, q, r, n = d_in, d_out, n_skills, n_splits, rank, batch * length
  inventory = k * r * (d + o)
  io = n * d + 2 * n * r + n * o  # read x, write and read h, write y
  params_flops = 2 * batch * k * r * (d + o) + 2 * n * r * (d + o)
  params_bytes = inventory + 2 * batch * r * (d + o) + io  # mixed A_b, B_b written and read
  skills_flops = 2 * n * k * r * (d + o) + 4 * n * q * k * r
  skills_bytes = inventory + 4 * n * q * k * r + io  # (B, L, Q, K, R) twice, written and read
  return {"parameters": params_flops + FLOPS_PER_BYTE * itemsize * params_bytes,
          "skills": skills_flops + FLOPS_PER_BYTE * itemsize * skills_bytes}


def mixed_path(x_shape: tuple[int, ...], lora_a_shape: tuple[int, ...], d_out: int,
               itemsize: int = 4) -> str:
  """``"parameters"`` or ``"skills"``: the cheaper path for a mixed-task batch of this shape."""
  bsz, length, d_in = x_shape
  n_splits, n_skills, _, rank = lora_a_shape
  costs = path_costs(d_in=d_in, d_out=d_out, n_skills=n_skills, n_splits=n_splits, rank=rank,
                     batch=bsz, length=length, itemsize=itemsize)
  return min(costs, key=costs.get)


def mixed_delta(x: Array, weights: Array, lora_a: Array, lora_b: Array, scale: float) -> Array:
  """The output change (B, L, O) of per-example weights w (B, Q, K), by the cheaper exact path."""
  d_out = lora_b.shape[0] * lora_b.shape[-1]
  if mixed_path(x.shape, lora_a.shape, d_out, x.dtype.itemsize) == "skills":
    return skills_delta(x, weights, lora_a, lora_b, scale)
  return low_rank_delta_batched(x, *mix_per_example(weights, lora_a, lora_b), scale)
