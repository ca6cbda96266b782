"""Checkpoint and adapter formats of other projects, in and out.

  peft     Hugging Face PEFT adapters: Poly / MHR in and out, MHR-mu or one task's adapter out as
           plain LoRA (``adapter_config.json`` + ``adapter_model.safetensors``).
  t5x      T5X checkpoints of T5 backbones (msgpack, tensorstore and orbax layouts).
  mttl     the authors' checkpoints (microsoft/mttl, camera-ready and newer tensor layouts).
  hf_names Hugging Face T5 module names of the adaptable layers and our layer paths.
  slots    adapter arrays per layer path: the adapter configuration they imply, filling a model's
           adapter slots, and reading them back out.

Hugging Face T5 backbones (``config.json`` + safetensors) are read and written by
``mhr_jax.hf_import``. Modules are imported on use: each pulls in only what its format needs.
"""
