"""PEFT adapters in and out (``mhr_jax.interop.peft``).

Parity runs against PEFT itself: from the adapter folders PEFT saved into the committed fixture
(always), and live with torch installed (PEFT saves, we import; we export, PEFT loads). Eval
mode throughout (noiseless routing); a padded batch with three different task ids.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import hf_t5_reference as t5_ref
import jit_forward
import peft_poly_reference as ref
from mhr_jax import adapters, hf_import
from mhr_jax.interop import peft as peft_io
from mhr_jax.interop.slots import AdapterImportError

try:
  import peft  # noqa: F401
  import torch  # noqa: F401
  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False

live = pytest.mark.skipif(not HAVE_TORCH, reason="torch/peft not installed: live tests skipped")
BACKBONE = ref.FIXTURE  # the HF T5 the PEFT fixture wraps (config.json + model.safetensors)
TASK_IDS = np.array([1, 2, 0], np.int32)


def assert_close(ours, theirs, tol=1e-5):
  np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * float(np.abs(theirs).max()))


@pytest.fixture(scope="module")
def mhr_model():
  """Our T5 on the fixture backbone with MHR adapters (S=4, K=4, r=2, alpha 2) drawn at random
  (lora_b non-zero), and one routing row frozen by ``add_tasks`` (so that export joins frozen and
  trainable rows). Shared by the tests, which only read it."""
  cfg = adapters.AdapterConfig(mode="mhr", n_tasks=1, n_skills=4, n_splits=4, lora_rank=2,
                               lora_alpha=2.0, layers="t0")
  model = hf_import.load_t5(BACKBONE, adapter_factory=adapters.make_adapter_factory(cfg))
  adapters.add_tasks(model, 2, jax.random.key(1))
  rng = np.random.default_rng(0)
  for var in jax.tree.leaves(nnx.state(model, nnx.Any(adapters.AdapterParam, adapters.RouterParam,
                                                      adapters.FrozenRouterParam)),
                             is_leaf=lambda x: isinstance(x, nnx.Variable)):
    var[...] = rng.normal(0, 0.5, var.shape).astype(np.float32)
  return model


@pytest.mark.parametrize("n_splits", ref.SPLITS)
def test_import_of_an_adapter_saved_by_peft(n_splits):
  with np.load(ref.FIXTURE / f"poly_s{n_splits}.npz") as f:
    r = dict(f)
  model, report = peft_io.load(BACKBONE, ref.FIXTURE / f"adapter_s{n_splits}")
  assert report.layout.startswith("PEFT POLY") and not report.skipped
  # 7 adapted layers per encoder block (2), 11 per decoder block (3), 3 tensors each.
  assert len(report.mapped) == 3 * (2 * 7 + 3 * 11)
  batch = {"input_ids": r["input_ids"], "labels": r["labels"]}
  assert_close(jit_forward.hf_batch_logits(model, batch, r["task_ids"]), r["logits"])


def test_round_trip_through_peft_files(tmp_path, mhr_model):
  model = mhr_model
  peft_io.save_poly(model, tmp_path / "poly")
  config = json.loads((tmp_path / "poly" / peft_io.CONFIG_FILE).read_text())
  assert (config["peft_type"], config["n_tasks"], config["n_splits"], config["r"]) == (
      "POLY", 3, 4, 2)
  assert config["target_modules"] == ["k", "o", "q", "v", "wi_0", "wi_1", "wo"]
  back, _ = peft_io.load(BACKBONE, tmp_path / "poly")
  batch = t5_ref.example_batch(seed=5)
  # alpha 2 became 1 / r in PEFT's convention with lora_B scaled: same outputs.
  assert_close(jit_forward.hf_batch_logits(back, batch, TASK_IDS), jit_forward.hf_batch_logits(model, batch, TASK_IDS))
  peft_io.save_lora(model, tmp_path / "task2", task_id=2)
  one, report = peft_io.load(BACKBONE, tmp_path / "task2")
  assert report.layout.startswith("PEFT LORA")
  assert_close(jit_forward.hf_batch_logits(one, batch, [0, 0, 0]), jit_forward.hf_batch_logits(model, batch, [2, 2, 2]))


def test_partial_targets_are_written_as_a_module_regex(mhr_model):
  paths = ["encoder/layers_1/attention/q", "encoder/layers_1/attention/v"]
  assert peft_io.target_modules(mhr_model, paths) == (
      r"(encoder\.block\.1\.layer\.0\.SelfAttention\.q|"
      r"encoder\.block\.1\.layer\.0\.SelfAttention\.v)")
  every_q = [p for p, _ in adapters.adapter_slots(mhr_model) if p.endswith("/q")]
  assert peft_io.target_modules(mhr_model, every_q) == ["q"]


def _copy_with(tmp_path, n_splits, change):
  src = ref.FIXTURE / f"adapter_s{n_splits}"
  config, tensors = peft_io.read_adapter(src)
  change(config, tensors)
  return peft_io._write(tmp_path, config, tensors)


def test_unmappable_tensors_are_refused_by_name(tmp_path):
  def change(config, tensors):
    tensors["base_model.model.lm_head.poly_lora_A"] = np.zeros((1, 4, 32, 2), np.float32)
    key = "base_model.model.encoder.block.1.layer.0.SelfAttention.v.poly_lora_A"
    tensors[key] = np.zeros((1, 4, 32, 3), np.float32)  # rank 3 in an r=2 adapter
    del tensors["base_model.model.decoder.block.0.layer.2.DenseReluDense.wo.poly_lora_B"]

  path = _copy_with(tmp_path, 1, change)
  with pytest.raises(AdapterImportError) as err:
    peft_io.load(BACKBONE, path)
  msg = str(err.value)
  assert "base_model.model.lm_head.poly_lora_A: not a" in msg
  assert "SelfAttention.v.poly_lora_A: shape (1, 4, 32, 3), the config (r=2," in msg
  assert "decoder.block.0.layer.2.DenseReluDense.wo: has ['poly_lora_A', " in msg


def test_lora_variants_without_an_equivalent_are_refused(tmp_path, mhr_model):
  peft_io.save_lora(mhr_model, tmp_path, task_id=0)
  config_file = tmp_path / peft_io.CONFIG_FILE
  config = json.loads(config_file.read_text())
  config["rank_pattern"] = {"q": 4}
  config_file.write_text(json.dumps(config))
  with pytest.raises(AdapterImportError, match="rank_pattern"):
    peft_io.load(BACKBONE, tmp_path)


def test_save_hf_refuses_a_model_with_adapters(tmp_path, mhr_model):
  with pytest.raises(ValueError, match=r"47 adapters .* adapters\.merge\(model, task_id\)"):
    hf_import.save_hf(mhr_model, tmp_path / "x")
  assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Live: PEFT saves and loads.


def _peft_logits(peft_model, batch, task_ids=None):
  import torch

  enc = torch.tensor(batch["input_ids"])
  kw = {} if task_ids is None else {"task_ids": torch.tensor(task_ids).long()}
  with torch.no_grad():
    out = peft_model(input_ids=enc, attention_mask=(enc > 0).long(),
                     labels=torch.tensor(batch["labels"]), **kw)
  return out.logits.numpy()


def _hf_base():
  import transformers

  return transformers.T5ForConditionalGeneration.from_pretrained(str(BACKBONE)).eval()


@live
@pytest.mark.parametrize("n_splits", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_live_peft_saves_we_import(tmp_path, n_splits):
  peft_model = ref.build(n_splits, seed=3)
  t5_ref.save_checkpoint(t5_ref.build_model(ref.VARIANT, 3), ref.VARIANT, tmp_path / "hf")
  ref.save_adapter(peft_model, tmp_path / "adapter")
  model, _ = peft_io.load(tmp_path / "hf", tmp_path / "adapter")
  batch = t5_ref.example_batch(seed=4)
  assert_close(jit_forward.hf_batch_logits(model, batch, TASK_IDS), _peft_logits(peft_model, batch, TASK_IDS))


@live
def test_live_peft_loads_our_exports(tmp_path, mhr_model):
  from peft import PeftModel

  model = mhr_model
  batch = t5_ref.example_batch(seed=6)
  peft_io.save_poly(model, tmp_path / "poly")
  poly = PeftModel.from_pretrained(_hf_base(), str(tmp_path / "poly")).eval()
  assert_close(_peft_logits(poly, batch, TASK_IDS), jit_forward.hf_batch_logits(model, batch, TASK_IDS))

  peft_io.save_lora(model, tmp_path / "task1", task_id=1)
  merged = PeftModel.from_pretrained(_hf_base(), str(tmp_path / "task1")).eval()
  assert_close(_peft_logits(merged, batch), jit_forward.hf_batch_logits(model, batch, [1, 1, 1]))

  mu = adapters.to_mhr_mu(nnx.clone(model))
  peft_io.save_lora(mu, tmp_path / "mu")
  averaged = PeftModel.from_pretrained(_hf_base(), str(tmp_path / "mu")).eval()
  ours_mu = jit_forward.hf_batch_logits(mu, batch, [0, 0, 0])
  assert_close(_peft_logits(averaged, batch), ours_mu)
  assert not np.allclose(ours_mu, jit_forward.hf_batch_logits(model, batch, [1, 1, 1]), atol=1e-3)
