"""The train step with the autodiff cross-entropy against ``models.token_nll``, side by side.

  python docs/bench/loss_ab.py small2 8

Builds the same MHR step twice, once with the loss written as log_softmax + take_along_axis
(what autodiff differentiates) and once with ``models.cross_entropy_loss``, checks that both
give the same loss, and times them in turn; prints the medians and their ratio.
"""

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.configs import StepConfig  # noqa: E402
from benchmarks.jax_runner import ours_step  # noqa: E402
from mhr_jax import models  # noqa: E402


def autodiff_cross_entropy(logits, targets, weights, *, label_smoothing=0.0,
                           normalize_by="tokens"):
  del label_smoothing, normalize_by
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  n = jnp.sum(weights)
  return jnp.sum(nll * weights) / jnp.maximum(n, 1.0), n


def main(shape: str, rounds: int):
  cfg = StepConfig(shape=shape, method="mhr")
  written = models.cross_entropy_loss
  runs = []
  for loss in (autodiff_cross_entropy, written):
    models.cross_entropy_loss = loss  # read by models.loss_fn when the step is traced
    s = ours_step(cfg)
    key = jax.random.key(0)
    compiled = jax.jit(s.train_step, donate_argnums=(0, 2)).lower(
        s.trainable, s.frozen, s.opt_state, s.batch, key).compile()
    state = {"t": s.trainable, "o": s.opt_state}

    def run(compiled=compiled, state=state, s=s, key=key):
      state["t"], state["o"], metrics = compiled(state["t"], s.frozen, state["o"], s.batch, key)
      return float(metrics["loss"])

    runs.append(run)
  models.cross_entropy_loss = written
  losses = [run() for run in runs]
  print(f"first-step loss: autodiff {losses[0]:.6f}, written-out {losses[1]:.6f}")
  times = [[], []]
  for _ in range(rounds):
    for j, run in enumerate(runs):
      t0 = time.perf_counter()
      run()
      times[j].append(time.perf_counter() - t0)
  old, new = (statistics.median(t) for t in times)
  print(f"{shape}: autodiff {old:.4f} s, written-out {new:.4f} s, ratio {old / new:.3f}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "small2", int(sys.argv[2]) if len(sys.argv) > 2
       else 8)
