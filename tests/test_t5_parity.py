"""Our T5 against Hugging Face transformers: committed fixture always, live when torch is present."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import hf_t5_reference as ref
from mhr_jax import decoding, hf_import, models

try:
  import torch  # noqa: F401
  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False

live = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed: live parity skipped")


def assert_close(ours, theirs, rtol=1e-5):
  """Within ``rtol`` relative to the reference's scale (elementwise)."""
  theirs = np.asarray(theirs)
  np.testing.assert_allclose(
      np.asarray(ours), theirs, rtol=rtol, atol=rtol * float(np.max(np.abs(theirs))))


def compare(model, r):
  enc = jnp.asarray(r["input_ids"], jnp.int32)
  labels = np.asarray(r["labels"])
  targets = jnp.asarray(np.where(labels < 0, 0, labels), jnp.int32)
  dec_in = models.shift_right(targets)
  np.testing.assert_array_equal(np.asarray(dec_in), r["decoder_input_ids"])
  assert_close(model.encode(enc), r["encoder_out"])
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
           "decoder_target_tokens": targets}
  logits = models.forward(model, batch)
  assert_close(logits, r["logits"])
  loss, n_tokens = models.cross_entropy_loss(logits, targets, models.loss_weights(batch))
  assert int(n_tokens) == int((labels >= 0).sum())
  assert_close(loss, r["loss"])
  steps = r["generated"].shape[1] - 1
  generated = decoding.greedy_decode(model, enc, None, steps + 1)
  np.testing.assert_array_equal(np.asarray(generated)[:, :steps], r["generated"][:, :steps])


@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_fixture_parity(variant):
  directory = ref.FIXTURES / f"t5_tiny_{variant}"
  model = hf_import.load_t5(directory)
  with np.load(directory / "reference.npz") as r:
    compare(model, dict(r))


@live
@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_live_parity(variant, tmp_path):
  hf_model = ref.build_model(variant, seed=7)
  ref.save_checkpoint(hf_model, variant, tmp_path)
  model = hf_import.load_t5(tmp_path)
  compare(model, {**ref.example_batch(3), **ref.reference_outputs(hf_model, ref.example_batch(3))})


@live
def test_export_loads_in_transformers(tmp_path):
  import torch
  import transformers

  model = hf_import.load_t5(ref.FIXTURES / "t5_tiny_v1_1")
  hf_import.save_hf(model, tmp_path)
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  batch = ref.example_batch(1)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(batch["input_ids"]),
                   attention_mask=torch.tensor(batch["input_ids"] > 0).long(),
                   labels=torch.tensor(batch["labels"]))
  enc = jnp.asarray(batch["input_ids"])
  assert_close(model.encode(enc), out.encoder_last_hidden_state.numpy())


def test_sharded_checkpoint(tmp_path):
  """The model.safetensors.index.json form gives the same parameters as the single file."""
  from safetensors.numpy import load_file, save_file

  src = ref.FIXTURES / "t5_tiny_v1_1"
  tensors = load_file(str(src / "model.safetensors"))
  names = sorted(tensors)
  half = len(names) // 2
  shards = {"model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:]}
  weight_map = {}
  for fname, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
    weight_map.update({k: fname for k in keys})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  shutil.copy(src / "config.json", tmp_path / "config.json")
  a = hf_import.backbone_params(hf_import.load_t5(src))
  b = hf_import.backbone_params(hf_import.load_t5(tmp_path))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]))


def _copy_fixture(tmp_path, edit):
  from safetensors.numpy import load_file, save_file

  src = ref.FIXTURES / "t5_tiny_v1_1"
  tensors = load_file(str(src / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(src / "config.json", tmp_path / "config.json")
  return tmp_path


def test_missing_tensor_is_named(tmp_path):
  name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
  path = _copy_fixture(tmp_path, lambda t: t.pop(name))
  with pytest.raises(hf_import.CheckpointMismatchError, match=r"missing \(1\): " + name.replace(".", r"\.")):
    hf_import.load_t5(path)


def test_wrong_shape_is_named(tmp_path):
  name = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"

  def edit(t):
    t[name] = t[name][:-1]

  path = _copy_fixture(tmp_path, edit)
  with pytest.raises(hf_import.CheckpointMismatchError, match=name.replace(".", r"\.") + r": checkpoint \(47, 32\), model expects \(48, 32\)"):
    hf_import.load_t5(path)


def test_unexpected_tensor_is_named(tmp_path):
  path = _copy_fixture(tmp_path, lambda t: t.update({"encoder.block.9.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(hf_import.CheckpointMismatchError, match=r"unexpected \(1\): encoder\.block\.9\.extra\.weight"):
    hf_import.load_t5(path)


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_import.load_t5(tmp_path / "nope")
