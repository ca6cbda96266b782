"""The train step with the autodiff cross-entropy against ``models.token_nll``, side by side.

  PYTHONPATH=. python docs/bench/loss_ab.py small2 8

Builds the same MHR step twice, once with the loss written as log_softmax + take_along_axis
(what autodiff differentiates) and once with ``models.cross_entropy_loss``, checks that both
give the same loss, and times them in turn; prints the medians and their ratio.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mhr_jax import bench, models  # noqa: E402


def autodiff_cross_entropy(logits, targets, weights, *, label_smoothing=0.0,
                           normalize_by="tokens"):
  del label_smoothing, normalize_by
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  n = jnp.sum(weights)
  return jnp.sum(nll * weights) / jnp.maximum(n, 1.0), n


def main(shape: str, rounds: int):
  cfg = bench.StepConfig(shape=shape, method="mhr")
  written = models.cross_entropy_loss
  runs = []
  for loss in (autodiff_cross_entropy, written):
    models.cross_entropy_loss = loss  # read by models.loss_fn when the step is traced
    model, tfilter, (inputs, targets, task_ids) = bench.build_ours(cfg)
    step, trainable, frozen, opt_state = bench.make_train_step(model, tfilter)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        trainable, opt_state, frozen, inputs, targets, task_ids, jax.random.key(0)).compile()
    state = {"t": trainable, "o": opt_state}

    def run(compiled=compiled, state=state, frozen=frozen, inputs=inputs, targets=targets,
            task_ids=task_ids):
      state["t"], state["o"], value = compiled(state["t"], state["o"], frozen, inputs, targets,
                                               task_ids, jax.random.key(0))
      return float(value)

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
