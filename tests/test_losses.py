"""The token cross-entropy and its hand-written gradient, against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhr_jax import models


def _reference_nll(logits, targets, smoothing):
  """NumPy float64: -((1 - s) log p[target] + s mean_v log p[v])."""
  x = np.asarray(logits, np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  return -((1 - smoothing) * picked + smoothing * logp.mean(-1))


def _reference_grad(logits, targets, smoothing, g):
  """d(sum g * nll)/dlogits = g (softmax - (1 - s) onehot - s / V), in float64."""
  x = np.asarray(logits, np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(x.shape[-1])[np.asarray(targets)]
  return np.asarray(g, np.float64)[..., None] * (p - (1 - smoothing) * onehot
                                                  - smoothing / x.shape[-1])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_nll_and_its_gradient_match_the_reference(smoothing):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(scale=4.0, size=(3, 5, 37)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 37, (3, 5)), jnp.int32)
  g = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  nll = models.token_nll(logits, targets, smoothing)
  np.testing.assert_allclose(nll, _reference_nll(logits, targets, smoothing), rtol=1e-5,
                             atol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(g * models.token_nll(x, targets, smoothing)))(logits)
  np.testing.assert_allclose(grad, _reference_grad(logits, targets, smoothing, g), atol=1e-6)


def test_cross_entropy_loss_weights_and_normalisation():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 11)), jnp.float32)
  targets = jnp.asarray([[3, 1, 0, 0], [5, 6, 1, 0]], jnp.int32)
  weights = (targets > 0).astype(jnp.float32)
  ref = _reference_nll(logits, targets, 0.0)
  loss, n = models.cross_entropy_loss(logits, targets, weights)
  assert float(n) == 5.0
  np.testing.assert_allclose(loss, (ref * np.asarray(weights)).sum() / 5.0, rtol=1e-6)
  loss_b, _ = models.cross_entropy_loss(logits, targets, weights, normalize_by="batch")
  np.testing.assert_allclose(loss_b, (ref * np.asarray(weights)).sum() / 2.0, rtol=1e-6)
  # Padding positions get no gradient.
  grad = jax.grad(lambda x: models.cross_entropy_loss(x, targets, weights)[0])(logits)
  assert np.all(np.asarray(grad)[0, 2:] == 0.0)
  with pytest.raises(ValueError, match="normalize_by"):
    models.cross_entropy_loss(logits, targets, weights, normalize_by="tokenz")


def test_token_nll_under_vmap_and_jit():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(4, 2, 3, 13)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 13, (4, 2, 3)), jnp.int32)

  def loss(x, t):
    return jnp.sum(models.token_nll(x, t, 0.1))

  grads = jax.jit(jax.vmap(jax.grad(loss)))(logits, targets)
  for i in range(4):
    np.testing.assert_allclose(
        grads[i], _reference_grad(logits[i], targets[i], 0.1, np.ones((2, 3))), atol=1e-6)
