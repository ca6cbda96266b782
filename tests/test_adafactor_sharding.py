"""Adafactor's optimizer state is created sharded over the mesh (factored statistics replicated)."""

import jax
import numpy as np
from flax import nnx

from mhr_jax import adapters, axes, network, optimizers, sharding, steps


def test_adafactor_state_of_adapters_is_sharded_and_initialised():
  cfg = network.preset("tiny", vocab_size=64)
  # Routing tables (200, 16 x 8): both dimensions >= 128, so optax factors their second moment.
  acfg = adapters.AdapterConfig(mode="mhr", n_tasks=200, n_skills=8, n_splits=16, lora_rank=2)
  model = network.T5(cfg, rngs=nnx.Rngs(0), adapter_factory=adapters.make_adapter_factory(acfg))
  _, trainable, _ = steps.split_model(model, adapters.trainable_filter("mhr"))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, model=2))
  # Adapters are replicated by default; shard lora_a's input dimension to see its moments follow.
  rules = sharding.extend_rules(sharding.logical_rules("fsdp_tp"), [(axes.ADAPTER_IN, "model")])
  for scale in (False, True):
    tx = optimizers.make_optimizer(optimizers.OptimizerConfig(
        name="adafactor", adafactor_scale_parameter=scale), trainable)
    opt_state, _ = steps.init_opt_state(tx, trainable, mesh, rules)
    leaves = jax.tree.leaves(opt_state)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    shapes = {x.shape for x in leaves}
    assert {(1,), (200,), (128,)} <= shapes  # placeholders, row and column statistics
    for x in leaves:
      if x.shape in ((1,), (200,), (128,)):
        assert x.sharding.is_fully_replicated
    assert any(not x.sharding.is_fully_replicated for x in leaves)  # lora_a's second moments
