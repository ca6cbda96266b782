"""The step profiler's op categories, FLOP counts and time accounting on known programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profiling


def _matmul_then_tanh():
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 128)), jnp.float32)
  b = jnp.asarray(np.random.default_rng(1).normal(size=(128, 64)), jnp.float32)
  return f, a, b


def test_hlo_ops_counts_the_dot_flops():
  f, a, b = _matmul_then_tanh()
  ops = profiling.hlo_ops(f.lower(a, b).compile().as_text())
  flops = sorted(op["flops"] for op in ops.values() if op["flops"])
  assert flops == [2.0 * 256 * 64 * 128], ops


def test_xla_profile_accounts_the_step():
  pytest.importorskip("tensorflow")
  f, a, b = _matmul_then_tanh()
  compiled = f.lower(a, b).compile()
  res = profiling.xla_profile(lambda i: jax.block_until_ready(compiled(a, b)),
                              compiled.as_text(), steps=3)
  cats = res["categories"]
  assert set(cats) == set(profiling.CATEGORIES)
  assert cats["matmul"] > 0
  assert res["matmul_flops"] == 2.0 * 256 * 64 * 128  # per step: one product per call
  # Categories partition the step's wall time: unattributed is the rest, never negative.
  attributed = sum(cats.values()) - cats["unattributed"]
  assert sum(cats.values()) == pytest.approx(max(res["step_s"], attributed), rel=1e-9)
  assert all(v >= 0 for v in cats.values())
  assert res["minor_faults"] >= 0 and res["kernel_cpu_s"] >= 0 and res["user_cpu_s"] >= 0


def test_torch_profile_counts_mm_flops_and_time():
  torch = pytest.importorskip("torch")
  a, b = torch.randn(256, 128), torch.randn(128, 64)
  res = profiling.torch_profile(lambda i: torch.tanh(a @ b).sum(), steps=3)
  assert res["matmul_flops"] == pytest.approx(2.0 * 256 * 64 * 128)
  assert res["categories"]["matmul"] > 0 and res["categories"]["elementwise"] > 0
  assert res["matmul_flops_per_s"] > 0


def test_categories():
  assert profiling._torch_category("aten::addmm") == "matmul"
  assert profiling._torch_category("aten::_scaled_dot_product_flash_attention") == "matmul"
  assert profiling._torch_category("aten::embedding_dense_backward") == "gather/scatter"
  assert profiling._torch_category("aten::copy_") == "copy/transpose"
  assert profiling._torch_category("aten::gelu") == "elementwise"
  assert profiling._xla_category("copy_bitcast_fusion.3", {"opcode": "fusion", "flops": 0}) == \
      "copy/transpose"
  assert profiling._xla_category("ynn_fusion.3", {"opcode": "fusion", "flops": 8.0}) == "matmul"


def test_hlo_ops_counts_each_dot_once_in_a_program_with_several():
  # Attention-like batched products stay plain `dot` ops on CPU; each must count only itself.
  def f(q, k, w):
    s = jnp.einsum("bqd,bkd->bqk", q, k)
    return jnp.tanh(jnp.einsum("bqk,bkd->bqd", s, k) @ w).sum()

  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(4, 32, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)
  ops = profiling.hlo_ops(jax.jit(f).lower(q, k, w).compile().as_text())
  expected = 2.0 * (4 * 16 * 32 * 8 + 4 * 16 * 8 * 32 + 4 * 16 * 24 * 8)
  assert sum(op["flops"] for op in ops.values()) == expected
