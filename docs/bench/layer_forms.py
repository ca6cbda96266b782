"""Forward + backward of one adapted layer's output change, in several exact formulations.

  python docs/bench/layer_forms.py [L] [R] [Q,...]      # defaults: 128 8 8

x (8, L, 512) -> (8, L, 384), K = 8 skills, rank R, Q splits (the T5-small q projection); the
gradients with respect to x, the weights and the skill inventory, in one jitted program per
formulation, timed in turn; prints the fastest of 60 rounds per formulation, in milliseconds:

  lora_2d     plain LoRA as one (B*L, D) x (D, R) product and one (B*L, R) x (R, O) product
  lora_3d     plain LoRA as the einsums "bld,dr->blr", "blr,ro->blo" (the layer before)
  mix_split   per-example mixing, then "blqd,bqdr->blr" and "blr,bqro->blqo" (the layer before)
  mix_batched per-example mixing into A^T (B, R, D), then ``routing.low_rank_delta_batched``
  one_2d      one mixed adapter for the batch (A as (D, R)), applied as ``lora_2d``
  one_shared  one mixed adapter (A transposed, (R, D)), through ``routing.shared_delta``
  lora_shared plain LoRA through ``routing.shared_delta`` (``adapters.LoRA``)
"""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mhr_jax import routing  # noqa: E402

B, D, O, K, SCALE = 8, 512, 384, 8, 0.125


def _plain(a, b):
  """Skill 0 of every split as one plain LoRA: A (D, R), B (R, O)."""
  a2 = a[:, 0].reshape(-1, a.shape[-1])  # (Q, D/Q, R) -> (D, R)
  b2 = jnp.moveaxis(b[:, 0], 1, 0).reshape(b.shape[2], -1)  # (Q, R, O/Q) -> (R, Q, O/Q) -> (R, O)
  return a2, b2


def _two_d(x, a2, b2):
  n = x.shape[0] * x.shape[1]
  y = (x.reshape(n, -1) @ a2) @ (b2 * SCALE)  # (B*L, D) x (D, R) x (R, O) -> (B*L, O)
  return y.reshape(x.shape[0], x.shape[1], -1)  # (B*L, O) -> (B, L, O)


FORMS = {
    "lora_2d": lambda x, w, a, b: _two_d(x, *_plain(a, b)),
    # (B, L, D) x (D, R) -> (B, L, R) x (R, O) -> (B, L, O)
    "lora_3d": lambda x, w, a, b: jnp.einsum(
        "blr,ro->blo", jnp.einsum("bld,dr->blr", x, _plain(a, b)[0]), _plain(a, b)[1]) * SCALE,
    "mix_split": lambda x, w, a, b: routing.low_rank_delta(x, *routing.mix(w, a, b), SCALE),
    "mix_batched": lambda x, w, a, b: routing.low_rank_delta_batched(
        x, *routing.mix_per_example(w, a, b), SCALE),
    "one_2d": lambda x, w, a, b: _two_d(
        x, *(lambda a_t, b2: (a_t.T, b2))(*routing.mix_shared(w[0], a, b))),
    "one_shared": lambda x, w, a, b: routing.shared_delta(
        x, *routing.mix_shared(w[0], a, b), SCALE),
    "lora_shared": lambda x, w, a, b: routing.shared_delta(
        x, *(lambda a2, b2: (a2.T, b2))(*_plain(a, b)), SCALE),
}


def main(length: int, rank: int, splits: list[int], rounds: int = 60):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, length, D)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(B, length, O)), jnp.float32)
  for q in splits:
    w = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, q, K)), jnp.float32), -1)
    a = jnp.asarray(rng.normal(size=(q, K, D // q, rank)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(q, K, rank, O // q)), jnp.float32)
    fns = {name: jax.jit(lambda x, w, a, b, f=f: jax.vjp(f, x, w, a, b)[1](dy))
           for name, f in FORMS.items()}
    for f in fns.values():
      jax.block_until_ready(f(x, w, a, b))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
      for name, f in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(f(x, w, a, b))
        best[name] = min(best[name], time.perf_counter() - t)
    print(f"L={length} R={rank} Q={q}: "
          + "  ".join(f"{name} {t * 1e3:.3f}" for name, t in best.items()), flush=True)


if __name__ == "__main__":
  args = sys.argv[1:]
  main(int(args[0]) if args else 128, int(args[1]) if len(args) > 1 else 8,
       [int(q) for q in args[2].split(",")] if len(args) > 2 else [8])
