"""bfloat16 compute: float32-accumulating dense matmuls (``layers.Precision.f32_accumulation``)
and the ``benchmarks.bf16_cpu`` module's pieces at tiny sizes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhr_jax import adapters, layers, models, network

BF16 = jnp.bfloat16


def _dots(fn, *args) -> list[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of every dot_general in ``fn``'s lowered StableHLO."""
  text = jax.jit(fn).lower(*args).as_text()
  pattern = r"stablehlo\.dot_general.*: \(tensor<[\dx]*x?(\w+)>, tensor<[\dx]*x?(\w+)>\) -> " \
            r"tensor<[\dx]*x?(\w+)>"
  return re.findall(pattern, text)


def test_accumulating_einsum_matches_numpy_forward_and_backward():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 16)), BF16)
  w = jnp.asarray(rng.normal(size=(16, 8)), BF16)
  g = jnp.asarray(rng.normal(size=(2, 5, 8)), BF16)
  y, vjp = jax.vjp(lambda x, w: layers.accumulating_einsum("...d,do->...o", x, w), x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == BF16
  # NumPy in float64 on the same bfloat16 values; each result rounded once to bfloat16.
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
  for got, want in ((y, x64 @ w64), (dx, g64 @ w64.T), (dw, np.einsum("bld,blo->do", x64, g64))):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -7, atol=1e-6)


def _dense(f32_accumulation: bool) -> layers.Dense:
  precision = layers.Precision(jnp.dtype(BF16), jnp.dtype(jnp.float32), f32_accumulation)
  return layers.Dense(16, 8, ("embed", "mlp"), precision=precision, init_std=0.1,
                      rngs=nnx.Rngs(0))


@pytest.mark.parametrize("f32_accumulation", [True, False])
def test_dense_dots_take_bf16_operands_and_return_f32_when_set(f32_accumulation):
  dense = _dense(f32_accumulation)
  graphdef, state = nnx.split(dense)
  x = jnp.ones((2, 5, 16), jnp.float32)

  def loss(state, x):
    y = nnx.merge(graphdef, state)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  dots = _dots(jax.grad(loss, argnums=(0, 1)), state, x)
  assert len(dots) == 3  # forward, and the input's and the kernel's gradient
  want = ("bf16", "bf16", "f32") if f32_accumulation else ("bf16", "bf16", "bf16")
  assert set(dots) == {want}


def test_t5_config_default_applies_f32_accumulation():
  cfg = network.preset("tiny", vocab_size=64, dtype="bfloat16")
  assert cfg.f32_accumulation and cfg.precision.f32_accumulation
  model = nnx.eval_shape(lambda: network.T5(cfg, rngs=nnx.Rngs(0)))
  assert model.encoder.layers_0.attention.q.precision.f32_accumulation
  off = nnx.eval_shape(lambda: network.T5(cfg.replace(f32_accumulation=False), rngs=nnx.Rngs(0)))
  assert not off.encoder.layers_0.attention.q.precision.f32_accumulation


@pytest.mark.slow  # two T5 gradient compilations: ~10 s of CPU
def test_bf16_train_gradient_runs_on_cpu_and_is_close_to_float32():
  """A Poly-adapted bfloat16 gradient compiles and runs on XLA:CPU (whose own dot kernel has no
  bf16 x bf16 -> f32 form) and stays close to float32's."""
  acfg = adapters.AdapterConfig(mode="poly", n_tasks=4, n_skills=4, lora_rank=2, layers="super_ni",
                                relaxed_bernoulli=False)
  rng = np.random.default_rng(0)
  batch = {"encoder_input_tokens": jnp.asarray(rng.integers(2, 64, (2, 12)), jnp.int32),
           "decoder_target_tokens": jnp.asarray(rng.integers(2, 64, (2, 6)), jnp.int32),
           "task_ids": jnp.asarray([0, 3], jnp.int32)}
  batch["decoder_input_tokens"] = models.shift_right(batch["decoder_target_tokens"])
  grads = {}
  for dtype in ("float32", "bfloat16"):
    cfg = network.preset("tiny", vocab_size=64, num_layers=1, dtype=dtype, dropout_rate=0.0)
    model = network.T5(cfg, rngs=nnx.Rngs(0),
                       adapter_factory=adapters.make_adapter_factory(acfg))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, graphdef=graphdef, rest=rest):
      return models.loss_fn(nnx.merge(graphdef, params, rest), batch, deterministic=True)[0]

    g = jax.jit(jax.grad(loss))(params)
    grads[dtype] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  ref = grads["float32"]
  assert np.all(np.isfinite(grads["bfloat16"]))
  rel = np.linalg.norm(grads["bfloat16"] - ref) / np.linalg.norm(ref)
  assert 0 < rel < 0.05, rel


def test_bf16_cpu_library_and_tables():
  from benchmarks import bf16_cpu
  assert bf16_cpu._library("ROOT %ynn_fusion = f32[2,2] fusion(...)") == "ynnpack"
  assert bf16_cpu._library("%dot = f32[2,2] dot(%a, %b)") == "eigen"
  records = bf16_cpu.measure_matmuls([16], rounds=1, settings=("default", "eigen"),
                                     forms=("f32", "bf16_out_f32"))
  keys = {r["candidate"] for r in records}
  assert keys == {"torch/f32", "torch/bf16", "xla/default/f32", "xla/default/bf16_out_f32",
                  "xla/eigen/f32", "xla/eigen/bf16_out_f32"}
  for r in records:
    assert "error" in r or r["gflops_best"] > 0, r
  steps = [{"part": "step", "config": "poly", "variant": v, "median_s": s, "cpu_median_s": s,
            "tokens_per_s": 1 / s} for v, s in (("ours_f32", 2.0), ("peft_bf16", 1.0))]
  table = bf16_cpu.tables(records + steps)
  assert "| poly | ours_f32 | 2 | 2 | 0.5 | 1x | 0.5x |" in table
  assert "xla/default/bf16_out_f32 | 16 |" in table
