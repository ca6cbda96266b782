"""T5X checkpoints (``mhr_jax.interop.t5x``) on the files T5X itself wrote (``../shared/data``).

``test_t5_tiny.checkpoint_0`` is a complete tiny T5 (msgpack layout); ``tiny_t5/checkpoint_1`` and
``tiny_orbax/1`` hold one dense layer's optimizer state in the tensorstore and orbax layouts. The
expected arrays are read here independently of the importer: the msgpack file with flax's
``msgpack_restore`` and the tensorstore chunks with gzip and NumPy.
"""

import gzip
import json
import shutil

import jax
import numpy as np
import pytest
from flax import serialization

import jit_forward
from mhr_jax import hf_import, models
from mhr_jax.hf_import import CheckpointMismatchError
from mhr_jax.interop import t5x

TINY = "t5x_checkpoints/test_t5_tiny.checkpoint_0"
# Our name for each T5X attention projection (the only names that differ besides the table).
RENAME = {"query": "q", "key": "k", "value": "v", "out": "o"}


def _flat(tree, prefix=()):
  for k, v in tree.items():
    yield from (_flat(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])


@pytest.fixture(scope="module")
def tiny(shared_data):
  path = shared_data / TINY
  raw = serialization.msgpack_restore(path.read_bytes())
  target = {p: np.asarray(v) for p, v in _flat(raw["optimizer"]["target"])}
  return path, target, t5x.load_t5x(path)


def test_tiny_t5_loads_every_tensor_unchanged(tiny):
  _, target, model = tiny
  ours = {p: np.asarray(v[...]) for p, v in hf_import.backbone_params(model).items()}
  assert len(ours) == len(target) == 52
  for path, arr in target.items():
    name = tuple(RENAME.get(p, p) if i == len(path) - 2 else p for i, p in enumerate(path))
    want = arr.T if path[-1] == "rel_embedding" else arr  # T5X: (heads, buckets)
    np.testing.assert_array_equal(ours.pop(name), want, err_msg="/".join(path))
  assert not ours  # every parameter of the model came from the file
  cfg = model.config
  assert (cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (32128, 8, 4, 3, 16)
  assert (cfg.num_layers, cfg.n_decoder_layers, cfg.feed_forward_proj) == (2, 2, "gated-gelu")
  assert not cfg.tie_word_embeddings and cfg.relative_attention_num_buckets == 32


def test_tiny_t5_runs_a_forward_pass(tiny):
  _, _, model = tiny
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 32128, (2, 9)).astype(np.int32)
  enc[1, 6:] = 0
  targets = rng.integers(2, 32128, (2, 5)).astype(np.int32)
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": models.shift_right(targets),
           "decoder_target_tokens": targets}
  logits = jit_forward.forward(model, batch)
  assert logits.shape == (2, 5, 32128) and np.isfinite(logits).all()
  assert np.std(logits) > 0
  ckpt = t5x.T5XCheckpoint(tiny[0])
  assert (ckpt.layout, ckpt.step) == ("msgpack", 0)


def test_missing_and_unexpected_tensors_are_named(tiny, tmp_path):
  path, _, model = tiny
  raw = serialization.msgpack_restore(path.read_bytes())
  layer = raw["optimizer"]["target"]["decoder"]["layers_1"]
  layer["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  del layer["mlp"]["wo"]
  bad = tmp_path / "checkpoint"
  bad.write_bytes(serialization.msgpack_serialize(raw))
  with pytest.raises(CheckpointMismatchError) as err:
    t5x.t5x_to_params(model.config, t5x.T5XCheckpoint(tmp_path))
  assert "missing (1): decoder/layers_1/mlp/wo/kernel" in str(err.value)
  assert "unexpected (1): decoder/layers_1/extra/kernel" in str(err.value)


def _chunks_by_hand(folder, spec):
  """One zarr array decoded with gzip and NumPy from T5X's spec (its chunks span the array)."""
  meta = spec["metadata"]
  assert meta["chunks"] == meta["shape"] and meta["compressor"]["id"] == "gzip"
  name = ".".join(["0"] * len(meta["shape"])) or "0"
  raw = gzip.decompress((folder / spec["kvstore"]["path"] / name).read_bytes())
  return np.frombuffer(raw, np.dtype(spec["dtype"]).newbyteorder("<")).reshape(meta["shape"])


def test_tensorstore_layout_reads_back_the_stored_arrays(shared_data):
  folder = shared_data / "t5x_checkpoints/tiny_t5/checkpoint_1"
  specs = serialization.msgpack_restore((folder / "checkpoint").read_bytes())
  specs = specs["optimizer"]["state"]["param_states"]
  ckpt = t5x.T5XCheckpoint(folder)
  assert ckpt.layout == "tensorstore" and ckpt.step == 1
  for name in ("kernel", "bias", "step"):
    got = ckpt.read(f"optimizer/state/param_states/{name}")
    want = _chunks_by_hand(folder, specs[name])
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
  assert ckpt.shape("optimizer/state/param_states/kernel") == (10, 5)


def test_orbax_layout_reads_the_same_state(shared_data, tmp_path):
  """T5X's orbax copy of the same state; its .zarray files were lost in the copy to T5X's test
  data, so they are put back here from the tensorstore layout's metadata (with orbax's zstd)."""
  base = shared_data / "t5x_checkpoints"
  with pytest.raises(FileNotFoundError, match=r"\.zarray"):
    t5x.T5XCheckpoint(base / "tiny_orbax/1").read("_optimizer/state/param_states/kernel")
  shutil.copytree(base / "tiny_orbax/1", tmp_path / "1")
  ts_ckpt = t5x.T5XCheckpoint(base / "tiny_t5/checkpoint_1")
  names = {"param_states/kernel": "float64", "param_states/bias": "float32",
           "param_states/step": "int32", "step": "int32"}
  for name, dtype in names.items():
    want = ts_ckpt.read(f"optimizer/state/{name}")
    folder = tmp_path / "1" / f"_optimizer.state.{name.replace('/', '.')}"
    folder.chmod(0o755)
    (folder / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": list(want.shape), "chunks": list(want.shape),
        "dtype": np.dtype(dtype).newbyteorder("<").str, "compressor": {"id": "zstd", "level": 1},
        "fill_value": None, "order": "C", "filters": None}))
  ckpt = t5x.T5XCheckpoint(tmp_path / "1")
  assert ckpt.layout == "orbax"
  for name in names:
    np.testing.assert_array_equal(ckpt.read(f"_optimizer/state/{name}"),
                                  ts_ckpt.read(f"optimizer/state/{name}"))


def test_orbax_pytree_of_t5x_orbax_manager(tiny, tmp_path):
  import orbax.checkpoint as ocp

  path, target, model = tiny
  tree = {"target": serialization.msgpack_restore(path.read_bytes())["optimizer"]["target"],
          "state": {"step": np.int32(7)}}
  ocp.PyTreeCheckpointer().save(tmp_path / "7" / "state", tree)
  ckpt = t5x.T5XCheckpoint(tmp_path / "7")
  assert (ckpt.layout, ckpt.step) == ("orbax-ocdbt", 7)
  params = t5x.t5x_to_params(model.config, ckpt)
  ours = hf_import.backbone_params(model)
  assert params.keys() == ours.keys()
  for p in params:
    np.testing.assert_array_equal(params[p], np.asarray(ours[p][...]))


def test_array_locations_resolve_against_the_checkpoint_folder():
  from etils import epath

  assert t5x._kvstore(epath.Path("gs://bucket/t5x/checkpoint_1"), "target.x/") == {
      "driver": "gcs", "bucket": "bucket", "path": "t5x/checkpoint_1/target.x/"}
  assert t5x._kvstore(epath.Path("/ckpt"), "state.step") == {"driver": "file",
                                                             "path": "/ckpt/state.step/"}
  assert t5x._kvstore(epath.Path("/ckpt"), "/elsewhere/a")["path"] == "/elsewhere/a/"


def _gin_model_config(path):
  """``ModelConfig`` as gin builds it with ``ModelConfig.t5x_checkpoint`` bound."""
  import gin

  from mhr_jax import trainer

  with gin.unlock_config():
    gin.parse_config([f"ModelConfig.t5x_checkpoint = '{path}'",
                      "ModelConfig.overrides = {'dropout_rate': 0.0}"])
  try:
    return trainer.ModelConfig()
  finally:
    gin.clear_config()


LORA = dict(mode="lora", n_skills=1, lora_rank=2, layers="super_ni")


def test_a_run_builds_its_backbone_from_a_t5x_checkpoint_bound_in_gin(tiny):
  from mhr_jax import adapters, data, run_state, sharding

  path, target, _ = tiny
  model_config = _gin_model_config(path)
  assert model_config.t5x_checkpoint == str(path) and model_config.backbone == str(path)
  model = run_state.build_model(model_config, adapters.AdapterConfig(**LORA),
                                data.TaskIdTable(("t",)), None, 0,
                                sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1]),
                                sharding.logical_rules("dp"))
  ours = {p: np.asarray(v[...]) for p, v in hf_import.backbone_params(model).items()}
  assert len(ours) == len(target) == 52
  for name in (("token_embedder", "embedding"), ("decoder", "logits_dense", "kernel"),
               ("encoder", "layers_1", "mlp", "wi_0", "kernel")):
    np.testing.assert_array_equal(ours[name], target[name], err_msg="/".join(name))
  np.testing.assert_array_equal(ours[("encoder", "relpos_bias", "rel_embedding")],
                                target[("encoder", "relpos_bias", "rel_embedding")].T)
  assert model.config.d_model == 8 and model.config.dropout_rate == 0.0


@pytest.mark.slow  # a 2-step training run on the 32k-vocabulary model: ~35 s on 2 cores
def test_training_starts_from_a_t5x_checkpoint(tiny, tmp_path):
  """Only adapters are saved; the checkpoint is recorded as the run's backbone."""
  from mhr_jax import adapters, checkpoints, trainer

  path, target, _ = tiny
  res = trainer.run(
      kind="pretrain", model_dir=str(tmp_path / "run"), model_config=_gin_model_config(path),
      adapter_config=adapters.AdapterConfig(**LORA),
      data_config=trainer.DataConfig(mixture="synthetic_pretrain", batch_size=8,
                                     feature_lengths={"inputs": 16, "targets": 16}),
      train_config=trainer.TrainConfig(steps=2, checkpoint_every=2, log_every=1))
  assert res["parameters"]["backbone"] == sum(a.size for a in target.values())
  saved = checkpoints.read_params(tmp_path / "run")
  assert saved and all("adapter" in "/".join(k) for k in saved)
  assert checkpoints.read_metadata(tmp_path / "run")["backbone"] == str(path)


def test_a_backbone_from_two_checkpoints_is_refused(tmp_path):
  from mhr_jax import errors, trainer

  with pytest.raises(errors.ConfigError, match="hf_checkpoint or t5x_checkpoint, not both"):
    trainer.ModelConfig(hf_checkpoint="/hf", t5x_checkpoint="/t5x")
  with pytest.raises(errors.MissingFileError, match="no T5X checkpoint there"):
    trainer.ModelConfig(t5x_checkpoint=str(tmp_path / "absent")).t5_config()
