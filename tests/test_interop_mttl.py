"""The authors' checkpoints (``mhr_jax.interop.mttl``), built here from mttl's documented names and
shapes (``mhr-camera-ready`` ``mttl/models/adapters.py`` and the newer
``mttl/models/modifiers/lora.py``), against a model given the same weights directly."""

import jax
import numpy as np
import pytest
from flax import nnx

import hf_t5_reference as t5_ref
import jit_forward
from mhr_jax import adapters, hf_import
from mhr_jax.interop import mttl, slots
from mhr_jax.interop.slots import AdapterImportError

BACKBONE = t5_ref.FIXTURES / "t5_tiny_v1_1"  # d_model 32, 4 heads of 8, d_ff 48; 2 + 3 layers
S, K, R, T = 4, 4, 2, 3  # the PEFT fixture's sizes, so its compiled forward is shared
ALPHA = 4.0
TASK_IDS = np.array([2, 0, 1], np.int32)
# Hugging Face module of every layer the T0 setting adapts, with its (in, out) features.
ATTN = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32)}
MLP = {"wi_0": (32, 48), "wi_1": (32, 48), "wo": (48, 32)}
MODULES = {}
for _i in range(2):
  MODULES.update({f"encoder.block.{_i}.layer.0.SelfAttention.{n}": d for n, d in ATTN.items()})
  MODULES.update({f"encoder.block.{_i}.layer.1.DenseReluDense.{n}": d for n, d in MLP.items()})
for _i in range(3):
  MODULES.update({f"decoder.block.{_i}.layer.0.SelfAttention.{n}": d for n, d in ATTN.items()})
  MODULES.update({f"decoder.block.{_i}.layer.1.EncDecAttention.{n}": d for n, d in ATTN.items()})
  MODULES.update({f"decoder.block.{_i}.layer.2.DenseReluDense.{n}": d for n, d in MLP.items()})

def authors_weights(seed=0):
  """{module: (lora_a, lora_b, module_logits)} in the camera-ready layout, drawn at random."""
  rng = np.random.default_rng(seed)
  return {m: (rng.normal(0, 0.3, (S, K, d // S, R)).astype(np.float32),
              rng.normal(0, 0.3, (S, K, R, o // S)).astype(np.float32),
              rng.normal(0, 1.0, (T, S * K)).astype(np.float32))
          for m, (d, o) in MODULES.items()}


def state_dict(weights, layout, *, logits=True):
  """A Lightning state dict: ``model.<module>.lora_a`` / ``lora_b`` / ``selector.module_logits``."""
  out = {}
  for m, (a, b, z) in weights.items():
    if layout == "newer":  # (S, K, D/S, r) -> (K, S, D/S, r); (S, K, r, O/S) -> (K, r, S, O/S)
      a = np.ascontiguousarray(a.transpose(1, 0, 2, 3))  # safetensors writes the raw buffer
      b = np.ascontiguousarray(b.transpose(1, 2, 0, 3))
    out[f"model.{m}.lora_a"], out[f"model.{m}.lora_b"] = a, b
    if logits:
      out[f"model.{m}.selector.module_logits"] = z
  return out


@pytest.fixture(scope="module")
def weights():
  return authors_weights()


@pytest.fixture(scope="module")
def direct(weights):
  """Our MHR model with the same weights written straight into its adapters."""
  cfg = adapters.AdapterConfig(mode="mhr", n_tasks=T, n_skills=K, n_splits=S, lora_rank=R,
                               lora_alpha=ALPHA, layers="t0")
  model = hf_import.load_t5(BACKBONE, adapter_factory=adapters.make_adapter_factory(cfg))
  slots = dict(adapters.adapter_slots(model))
  assert len(slots) == len(weights) == 2 * 7 + 3 * 11
  for path, layer in slots.items():
    stack, i, block, proj = path.split("/")
    m = next(m for m in weights if m.startswith(f"{stack}.block.{i[7:]}.") and m.endswith(
        ("SelfAttention." if block in ("attention", "self_attention") else
         "EncDecAttention." if block == "encoder_decoder_attention" else "DenseReluDense.")
        + proj))
    a, b, z = weights[m]
    layer.adapter.lora_a[...], layer.adapter.lora_b[...] = a, b
    layer.adapter.router.router_logits[...] = z
  return model


def logits(model, task_ids=TASK_IDS):
  return jit_forward.hf_batch_logits(model, t5_ref.example_batch(seed=2), task_ids)


def blank(model):
  """A copy of ``model`` with every adapter and routing tensor zeroed."""
  model = nnx.clone(model)
  for var in jax.tree.leaves(nnx.state(model, nnx.Any(adapters.AdapterParam, adapters.RouterParam)),
                             is_leaf=lambda x: isinstance(x, nnx.Variable)):
    var[...] = np.zeros(var.shape, np.float32)
  return model


def test_camera_ready_checkpoint_reproduces_the_directly_built_model(tmp_path, weights, direct):
  from safetensors.numpy import save_file

  save_file(state_dict(weights, "camera_ready"), str(tmp_path / "adapters.safetensors"))
  model, report = mttl.load(BACKBONE, tmp_path / "adapters.safetensors", lora_alpha=ALPHA)
  assert report.layout == "mttl camera_ready" and not report.skipped
  assert len(report.mapped) == 3 * len(MODULES)
  assert "mode mhr, n_splits=4, n_skills=4, rank=2, n_tasks=3" in report.notes[0]
  np.testing.assert_allclose(logits(model), logits(direct), rtol=1e-6, atol=1e-6)


def test_newer_checkpoint_reproduces_the_directly_built_model(weights, direct):
  model = blank(direct)
  state = state_dict(weights, "newer")
  report = mttl.assign_checkpoint(model, {"state_dict": state,
                                          "hyper_parameters": {"lora_alpha": ALPHA}})
  assert report.layout == "mttl newer" and len(report.mapped) == len(state)
  np.testing.assert_allclose(logits(model), logits(direct), rtol=1e-6, atol=1e-6)
  # One layer against mttl's own einsums (SkilledLoRA.forward: bqs,sqdr->bqdr and
  # bqs,srqd->brqd) written out in NumPy on the file's tensors.
  module = "decoder.block.1.layer.2.DenseReluDense.wo"
  a, b, z = (state[f"model.{module}.{n}"] for n in ("lora_a", "lora_b", "selector.module_logits"))
  s = 1 / (1 + np.exp(-z[TASK_IDS].reshape(3, S, K)))
  w = s / (s.sum(-1, keepdims=True) + 1e-12)  # PolytroponSelector, eval
  x = np.random.default_rng(3).normal(size=(3, 5, 48)).astype(np.float32)
  big_a = np.einsum("bqs,sqdr->bqdr", w, a).reshape(3, 48, R)
  big_b = np.einsum("bqs,srqd->brqd", w, b).reshape(3, R, 32)
  want = x @ big_a @ big_b * (ALPHA / R)
  got = model.decoder.layers_1.mlp.wo.adapter(x, TASK_IDS, deterministic=True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_average_selector_checkpoint_imports_as_mhr_mu(weights, direct):
  """No module_logits: mttl's average selector, i.e. MHR-mu (skills averaged per split)."""
  want = adapters.to_mhr_mu(nnx.clone(direct))
  model = blank(want)
  report = mttl.assign_checkpoint(model, {
      "state_dict": state_dict(weights, "camera_ready", logits=False),
      "hyper_parameters": {"lora_alpha": ALPHA}})
  assert report.layout == "mttl camera_ready, averaged"
  assert "mode mhr_mu" in report.notes[0] and "hyper-parameters" in report.notes[1]
  got, ref_ = dict(adapters.adapter_slots(model)), dict(adapters.adapter_slots(want))
  for path in ref_:
    for name in ("lora_a", "lora_b"):
      np.testing.assert_allclose(np.asarray(getattr(got[path].adapter, name)[...]),
                                 np.asarray(getattr(ref_[path].adapter, name)[...]),
                                 rtol=1e-6, atol=1e-7, err_msg=f"{path} {name}")


def test_unmappable_and_ambiguous_tensors_are_named(weights, direct):
  dims = {p: (d.in_dim, d.out_dim) for p, d in slots.dense_layers(direct).items()}
  state = state_dict(weights, "camera_ready")
  state["model.lm_head.lora_a"] = np.zeros((32, 2), np.float32)
  with pytest.raises(AdapterImportError, match=r"model\.lm_head\.lora_a: not an mttl adapter"):
    mttl.layer_arrays(state, dims)
  arrays, layout, skipped = mttl.layer_arrays(state, dims, strict=False)
  assert len(arrays) == len(MODULES) and list(skipped) == ["model.lm_head.lora_a"]
  # S = K = r: both layouts fit the shapes, so the caller must say which.
  square = {"model.encoder.block.0.layer.0.SelfAttention.q.lora_a": np.zeros((2, 2, 16, 2)),
            "model.encoder.block.0.layer.0.SelfAttention.q.lora_b": np.zeros((2, 2, 2, 16))}
  with pytest.raises(AdapterImportError, match="fit both layouts"):
    mttl.layer_arrays(square, dims)
  assert mttl.layer_arrays(square, dims, layout="newer")[1] == "newer, averaged"
  with pytest.raises(AdapterImportError, match="poly_use_shared_skill"):
    mttl.load(BACKBONE, {"state_dict": state, "hyper_parameters": {"poly_use_shared_skill": True}})


def test_lightning_checkpoint_file(tmp_path, weights):
  torch = pytest.importorskip("torch", reason="torch not installed: .ckpt reading skipped")
  state = state_dict(weights, "camera_ready")
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()},
              "hyper_parameters": {"lora_alpha": ALPHA, "n_splits": S}, "epoch": 3},
             tmp_path / "last.ckpt")
  read, hparams = mttl.read_checkpoint(tmp_path / "last.ckpt")
  assert hparams["lora_alpha"] == ALPHA and read.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(read[k], state[k])
