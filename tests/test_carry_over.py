"""A run that starts from a checkpoint: which adapter settings come from the checkpoint, which from
the run (gin's bindings decide, as ``Config.was_overridden`` does for the authors'
``pl_finetune.py``), the errors for settings that cannot apply, and what the run saves."""

import dataclasses

import gin
import pytest
from etils import epath

from mhr_jax import (adapters, analysis, carry_over, checkpoints, errors, modes, optimizers,
                     run_state, sharding, train, trainer)

TINY = {"vocab_size": 259, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4,
        "num_layers": 1, "dropout_rate": 0.0}
# The parent's adapter settings: none is the AdapterConfig default, so that "carried over" and
# "the run's own value" can be told apart, including a run value equal to the default.
PARENT = dict(n_skills=2, n_splits=2, lora_rank=2, layers="super_ni", init="peft",
              lora_alpha=4.0, relaxed_bernoulli=True, temperature=0.5)
OTHER = dict(n_skills=4, n_splits=4, lora_rank=3, layers="t0", init="authors",
             lora_alpha=2.0, relaxed_bernoulli=False, temperature=2.0)
DEFAULTS = adapters.AdapterConfig()


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
  """An MHR pre-training run's checkpoint (its initial state saved as step 1; nothing compiled),
  as ``checkpoints.read_metadata`` gives it."""
  model_dir = tmp_path_factory.mktemp("parent") / "run"
  model_dir.mkdir()
  state = run_state.build_state(
      modes.get_kind("pretrain"), epath.Path(model_dir),
      trainer.ModelConfig(size="tiny", overrides=TINY),
      adapters.AdapterConfig(mode="mhr", **PARENT), optimizers.OptimizerConfig(),
      trainer.DataConfig(mixture="synthetic_pretrain", feature_lengths={"inputs": 24,
                                                                         "targets": 24}),
      trainer.TrainConfig(steps=1), sharding.MeshConfig(), "dp")
  ckpt = checkpoints.CheckpointManager(str(model_dir / "checkpoints"))
  ckpt.save(1, state.trainable, state.opt_state, data_position=1, metadata=state.metadata)
  ckpt.wait_until_finished()
  ckpt.close()
  return checkpoints.read_metadata(model_dir)


def _rebuilt(parent, *bindings):
  """The config the parent's model is rebuilt with for a run whose gin config is ``bindings``."""
  gin.clear_config()
  try:
    gin.parse_config(["run.adapter_config = @AdapterConfig()", "AdapterConfig.mode = 'mhr'",
                      *bindings])
    return carry_over.rebuilt_config(gin.get_configurable("AdapterConfig")(), parent,
                                     trainer.adapter_fields_bound())
  finally:
    gin.clear_config()


def test_every_adapter_field_has_a_rule():
  fields = {f.name for f in dataclasses.fields(adapters.AdapterConfig)}
  ruled = {"mode", *carry_over.USER_WINS, *carry_over.FIXED, *carry_over.FROM_PARENT}
  assert ruled == fields
  assert set(PARENT) == set(carry_over.USER_WINS) | set(carry_over.FIXED)


@pytest.mark.parametrize("name", carry_over.USER_WINS)
def test_run_value_wins_where_bound_and_the_checkpoints_applies_elsewhere(parent, name):
  default = getattr(DEFAULTS, name)
  assert PARENT[name] != default
  assert getattr(_rebuilt(parent), name) == PARENT[name]
  # Bound to the default value: still the run's (a comparison with the default would miss it).
  assert getattr(_rebuilt(parent, f"AdapterConfig.{name} = {default!r}"), name) == default
  assert getattr(_rebuilt(parent, f"AdapterConfig.{name} = {OTHER[name]!r}"), name) == OTHER[name]
  # Through a macro, as the gin files bind them.
  assert getattr(_rebuilt(parent, f"AdapterConfig.{name} = %V", f"V = {OTHER[name]!r}"),
                 name) == OTHER[name]


@pytest.mark.parametrize("name", carry_over.FIXED)
def test_structure_comes_from_the_checkpoint_and_a_contradiction_names_both(parent, name):
  assert getattr(_rebuilt(parent), name) == PARENT[name]
  assert getattr(_rebuilt(parent, f"AdapterConfig.{name} = {PARENT[name]!r}"),
                 name) == PARENT[name]
  default = getattr(DEFAULTS, name)
  for value in (default, OTHER[name]):  # the default too: bound, so it is the run's request
    with pytest.raises(errors.ConfigError,
                       match=rf"AdapterConfig\.{name}={value!r}, but .* was trained with "
                             rf"{name}={PARENT[name]!r}"):
      _rebuilt(parent, f"AdapterConfig.{name} = {value!r}")


def test_bindings_of_a_scoped_config_and_its_enclosing_scopes_count_as_set():
  gin.clear_config()
  try:
    gin.parse_config(["run.adapter_config = @ft/AdapterConfig()", "ft/AdapterConfig.init = 'peft'",
                      "AdapterConfig.lora_alpha = 1.0", "other/AdapterConfig.n_splits = 4"])
    assert trainer.adapter_fields_bound() == {"init", "lora_alpha"}
    gin.clear_config()
    assert trainer.adapter_fields_bound() is None  # gin does not build the config
  finally:
    gin.clear_config()


def test_a_config_built_in_python_counts_fields_off_their_default(parent):
  cfg = adapters.AdapterConfig(mode="mhr_z", temperature=2.0, lora_alpha=DEFAULTS.lora_alpha)
  assert carry_over.fields_set(cfg) == {"mode", "temperature"}
  rebuilt = carry_over.rebuilt_config(cfg, parent, carry_over.fields_set(cfg))
  assert (rebuilt.temperature, rebuilt.lora_alpha, rebuilt.mode) == (2.0, 4.0, "mhr")


def _check_saved(parent, model_dir, mode):
  """The run's checkpoint records the parent's structure with the run's lora_alpha (bound to the
  default value), mode and task rows; the model rebuilt from that record restores its state."""
  saved = checkpoints.read_metadata(model_dir)
  n_parent = len(parent["task_names"])
  assert saved["task_names"] == parent["task_names"] + ["synthetic_heldout_000_v1"]
  want = dict(parent["adapter_config"], mode=mode, lora_alpha=1.0, n_tasks=n_parent + 1,
              n_frozen_tasks=n_parent)
  assert saved["adapter_config"] == want
  assert saved["model_config"] == parent["model_config"]  # the backbone built is the parent's
  model, _ = analysis.load_model(model_dir, saved["step"])  # raises naming what does not fit
  router = adapters.routers(model)[0]
  assert (router.relaxed_bernoulli, router.temperature) == (True, 0.5)
  assert (router.n_splits, router.n_skills, router.n_tasks) == (2, 2, n_parent + 1)
  assert router.frozen_router_logits.shape[0] == n_parent
  assert adapters.adapter_slots(model) and all(
      l.adapter.scale == 1.0 / 2 for _, l in adapters.adapter_slots(model))


def test_finetuning_from_the_command_line_saves_the_structure_it_built(parent, tmp_path):
  """``python -m mhr_jax.train`` with the shipped gin files, binding none of the parent's adapter
  settings but lora_alpha (to the default value): one MHR-z step (only the new routing row
  trains), then what its checkpoint records is read back."""
  model_dir = tmp_path / "ft"
  gin.clear_config()
  try:
    status = train.main([
        "--gin_file=runs/finetune.gin", "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=overlays/cpu_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.MIXTURE='synthetic_heldout_000_v1'", f"--gin.INIT_FROM='{parent['path']}'",
        "--gin.TRAIN_STEPS=1", "--gin.VMAP_TASKS=False", "--gin.INPUTS_LENGTH=24",
        "--gin.TARGETS_LENGTH=24", "--gin.run.adapter_config=@AdapterConfig()",
        "--gin.AdapterConfig.mode='mhr_z'", "--gin.AdapterConfig.lora_alpha=1.0"])
  finally:
    gin.clear_config()
  assert status == 0
  _check_saved(parent, model_dir, "mhr_z")
