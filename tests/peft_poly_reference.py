"""PEFT's Poly tuner on a small random Hugging Face T5: the reference for the Poly/MHR parity test.

Used live by ``test_peft_parity.py`` when torch is installed, and to (re)write the committed
fixture that the test reads without torch:

    python tests/peft_poly_reference.py   # writes tests/fixtures/peft_poly/

Besides the arrays and logits (``poly_s{S}.npz``), the fixture holds each PEFT model as PEFT itself
saves it (``adapter_s{S}/``: ``adapter_config.json`` + ``adapter_model.safetensors``), which the
importer tests read without torch.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

import hf_t5_reference as t5_ref

FIXTURE = t5_ref.FIXTURES / "peft_poly"
VARIANT = "v1_1"
N_TASKS, N_SKILLS, RANK = 3, 4, 2
SPLITS = (1, 4)
TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]  # the T0 setting
TASK_IDS = np.array([2, 0, 1], np.int32)  # one batch, three different tasks

# Hugging Face module prefix -> our layer path (the Dense that holds the adapter slot).
_HF_TO_OURS = [
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(\w+)", r"encoder/layers_\1/attention/\2"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(\w+)", r"encoder/layers_\1/mlp/\2"),
    (r"decoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(\w+)",
     r"decoder/layers_\1/self_attention/\2"),
    (r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.(\w+)",
     r"decoder/layers_\1/encoder_decoder_attention/\2"),
    (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(\w+)", r"decoder/layers_\1/mlp/\2"),
]


def our_path(hf_module: str) -> str:
  for pattern, repl in _HF_TO_OURS:
    if re.fullmatch(pattern, hf_module):
      return re.sub(pattern, repl, hf_module)
  raise KeyError(f"no layer path for Hugging Face module {hf_module!r}")


def build(n_splits: int, seed: int = 0):
  """The random HF T5 of ``hf_t5_reference.build_model(VARIANT, seed)`` wrapped by PEFT Poly, in
  eval mode, every Poly parameter drawn non-zero (PEFT starts lora_B at 0)."""
  import peft
  import torch

  config = peft.PolyConfig(
      task_type="SEQ_2_SEQ_LM", poly_type="poly", r=RANK, n_tasks=N_TASKS, n_skills=N_SKILLS,
      n_splits=n_splits, target_modules=TARGETS)
  model = peft.get_peft_model(t5_ref.build_model(VARIANT, seed), config).eval()
  torch.manual_seed(seed + 100)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "poly_" in name:
        p.copy_(torch.randn_like(p) * 0.5)
  return model


def adapter_arrays(model) -> dict[str, np.ndarray]:
  """Poly parameters keyed ``"<our layer path>:<lora_a|lora_b|router_logits>"``."""
  out = {}
  for name, p in model.named_parameters():
    m = re.match(
        r"base_model\.model\.(.+)\.poly_(lora_A|lora_B|router)\.default(\.module_logits)?$", name)
    if not m:
      continue
    kind = {"lora_A": "lora_a", "lora_B": "lora_b", "router": "router_logits"}[m.group(2)]
    out[f"{our_path(m.group(1))}:{kind}"] = p.detach().numpy().astype(np.float32)
  return out


def reference_logits(model, batch: dict, task_ids: np.ndarray) -> np.ndarray:
  import torch

  enc = torch.tensor(batch["input_ids"])
  with torch.no_grad():  # padding (id 0) masked as our T5 masks it
    out = model(input_ids=enc, attention_mask=(enc > 0).long(),
                labels=torch.tensor(batch["labels"]), task_ids=torch.tensor(task_ids).long())
  return out.logits.numpy()


def save_adapter(model, directory: pathlib.Path) -> None:
  """The PEFT adapter folder as ``save_pretrained`` writes it, without its model-card README."""
  model.save_pretrained(str(directory))
  (directory / "README.md").unlink(missing_ok=True)


def write_adapter_folders(directory: pathlib.Path = FIXTURE) -> None:
  for n_splits in SPLITS:
    save_adapter(build(n_splits), directory / f"adapter_s{n_splits}")


def write_fixture(directory: pathlib.Path = FIXTURE) -> None:
  batch = t5_ref.example_batch(seed=1)
  for n_splits in SPLITS:
    model = build(n_splits)
    if n_splits == SPLITS[0]:
      t5_ref.save_checkpoint(t5_ref.build_model(VARIANT, 0), VARIANT, directory)
    arrays = adapter_arrays(model)
    np.savez_compressed(
        directory / f"poly_s{n_splits}.npz", input_ids=batch["input_ids"], labels=batch["labels"],
        task_ids=TASK_IDS, logits=reference_logits(model, batch, TASK_IDS),
        **{f"adapter:{k}": v for k, v in arrays.items()})
  write_adapter_folders(directory)


if __name__ == "__main__":
  write_fixture()
  print(f"wrote {FIXTURE}")
