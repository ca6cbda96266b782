"""The T0 few-shot preset trains with the T-Few losses (TrainConfig.loss = "tfew").

A tiny MHR run pre-trains on the synthetic mixture, then ``experiments/t0_fewshot/rte.gin`` (with
``overlays/cpu_tiny.gin``) fine-tunes it on a small RTE fixture written here in ``tasks/t0.py``'s
layout: two templates, eight few-shot rows, four validation rows and a SentencePiece model trained
on the fixture's text. The seqio registries are copied for the test, so the fixture's RTE tasks
do not collide with the ones other tests register from ``../shared/data``.
"""

import json
import math

import gin
import pytest
import seqio

from mhr_jax import adapters, errors, optimizers, train, trainer
from tasks import t0

TEMPLATES = """dataset: super_glue
subset: rte
templates:
  t1: !Template
    answer_choices: yes ||| no
    id: t1
    jinja: '{{premise}} Does this mean that "{{hypothesis}}" is true? ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      original_task: true
    name: does this imply
  t2: !Template
    answer_choices: true ||| false
    id: t2
    jinja: '{{premise}} Question: {{hypothesis}} True or False? ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      original_task: true
    name: true or false
"""
PREMISES = ["the cat sat on the mat", "a dog ran in the park", "it rained all day",
            "she read a long book", "the sun is hot", "birds can fly", "he ate an apple",
            "the shop was closed"]


def _write_fixture(root):
  """tasks/t0.py's layout for RTE alone, and a tokenizer trained on its text."""
  import sentencepiece as spm

  rows = [{"premise": p, "hypothesis": p.split()[-1] + " is here", "label": i % 2}
          for i, p in enumerate(PREMISES)]
  shots = root / "t0_heldout" / "fewshot" / "rte" / "32_shot"
  shots.mkdir(parents=True)
  (shots / "42_seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  val = root / "t0_heldout" / "eval" / "super_glue" / "RTE"
  val.mkdir(parents=True)
  names = ["entailment", "not_entailment"]
  (val / "val.jsonl").write_text("".join(
      json.dumps({**r, "label": names[r["label"]]}) + "\n" for r in rows[:4]))
  tpl = root / "promptsource_templates" / "super_glue" / "rte"
  tpl.mkdir(parents=True)
  (tpl / "templates.yaml").write_text(TEMPLATES)
  (root / "tokenizer").mkdir()
  text = root / "tokenizer" / "text.txt"
  text.write_text("\n".join(PREMISES + ["Does this mean that is true? Question: True or False? "
                                        "yes no true false is here"]) + "\n")
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(root / "tokenizer" / "spiece"), vocab_size=64,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False)


@pytest.fixture
def isolated_registry(monkeypatch):
  """The seqio registries without T0 tasks and tasks.t0's registration records, restored after
  the test."""
  # Without the T0 tasks that earlier tests registered (from shared data): this test registers
  # its own under the same names.
  for registry in (seqio.TaskRegistry, seqio.MixtureRegistry):
    kept = {k: v for k, v in registry._REGISTRY.items() if not k.startswith("t0_")}
    monkeypatch.setattr(registry, "_REGISTRY", kept)
  monkeypatch.setattr(t0, "_DATASETS_DONE", {})
  monkeypatch.setattr(t0, "_CALLS", {})
  monkeypatch.delenv("MHR_SPM_PATH", raising=False)
  gin.clear_config()
  yield
  gin.clear_config()


def _parent(model_dir, overrides):
  """A 1-step MHR pre-training run with the preset's adapter structure on the tiny model."""
  return trainer.run(
      kind="pretrain", model_dir=str(model_dir),
      model_config=trainer.ModelConfig(size="tiny", overrides=overrides),
      adapter_config=adapters.AdapterConfig(mode="mhr", n_skills=8, n_splits=64, lora_rank=1,
                                             layers="t0"),
      optimizer_config=optimizers.OptimizerConfig(learning_rate=1e-2),
      data_config=trainer.DataConfig(mixture="synthetic_pretrain",
                                     feature_lengths={"inputs": 32, "targets": 32}, batch_size=8),
      train_config=trainer.TrainConfig(steps=1, checkpoint_every=1, log_every=1))


@pytest.mark.slow  # two runs and an evaluation: ~2-4 minutes on 2 shared cores
@pytest.mark.parametrize("source", ["fixture", "shared"])
def test_rte_fewshot_preset_trains_with_the_tfew_losses(tmp_path, isolated_registry, source,
                                                        request):
  """On the fixture, and on the real RTE few-shot split and T5 vocabulary of ../shared/data
  (cpu_tiny caps the evaluation at 16 examples per template)."""
  if source == "fixture":
    data_dir, overrides, n_eval = tmp_path / "t0", {"vocab_size": 259}, 4
    _write_fixture(data_dir)
  else:  # The tiny model's default vocabulary is T5's 32128 ids.
    data_dir, overrides, n_eval = request.getfixturevalue("shared_data"), {}, 16
  _parent(tmp_path / "parent", overrides)
  run_dir = tmp_path / "rte"
  train.parse_gin(
      ["experiments/t0_fewshot/rte.gin", "overlays/cpu_tiny.gin"],
      [f"MODEL_DIR='{run_dir}'", f"INIT_FROM='{tmp_path / 'parent'}'",
       f"T0_DATA_DIR='{data_dir}'", "TRAIN_STEPS=2",
       # The preset's buckets scaled to cpu_tiny's 32 / 32 lengths: batches are cut in training
       # and evaluation as in a real run.
       'DataConfig.length_buckets={"inputs": [16], "targets": [8, 16]}'], [])
  assert gin.get_bindings("run")["train_config"].loss == "tfew"
  results = train.main_entry()

  train_lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train_lines = [r for r in train_lines if r["split"] == "train"]
  assert [r["step"] for r in train_lines] == [1, 2]
  for r in train_lines:
    # The loss the step minimised is LM + MC + UL (weights 1 in the preset): an LM-only step
    # would log neither term, and its loss would equal lm_loss.
    # (UL, -log(1 - p + 0.01), is slightly negative where the wrong choices are unlikely.)
    assert r["mc_loss"] > 0.1 and r["unlikely_loss"] != 0
    assert math.isclose(r["loss"], r["lm_loss"] + r["mc_loss"] + r["unlikely_loss"],
                        rel_tol=1e-5)
    assert r["loss"] > r["lm_loss"] + 0.1
    assert 0.0 <= r["accuracy"] <= 1.0
  assert results["final_loss"] == train_lines[-1]["loss"]
  # One routing row for the dataset, after the parent's tasks; every template evaluated.
  table = json.loads((run_dir / "task_ids.json").read_text())["tasks"]
  assert max(table, key=table.get) == "t0_rte_fewshot"
  templates = [t.name for t in seqio.get_mixture_or_task("t0_rte_fewshot_eval").tasks]
  assert len(templates) >= 2 and sorted(results["eval"]) == sorted(templates + ["t0_rte"])
  assert all(results["eval"][t]["n_examples"] == n_eval for t in templates)
  # The dataset as a whole, under the paper's protocols (mhr_jax.protocol).
  rte = results["eval"]["t0_rte"]
  assert rte["n_templates"] == len(templates) and rte["n_examples"] == n_eval
  assert 0.0 <= rte["accuracy_random_template"] <= 100.0
  # The written operative config holds the preset's registration bindings and the loss.
  written = (run_dir / "config.gin").read_text()
  assert "register_t0.shots = 32" in written and "register_t0.datasets = ['rte']" in written
  assert "TrainConfig.loss = 'tfew'" in written or "loss = 'tfew'" in written


def test_tfew_loss_needs_choice_examples_and_no_label_smoothing(tmp_path):
  with pytest.raises(errors.ConfigError, match="label_smoothing=0.1"):
    trainer.TrainConfig(loss="tfew", label_smoothing=0.1)
  with pytest.raises(errors.ConfigError, match="'ce'"):
    trainer.TrainConfig(loss="ce")
  with pytest.raises(errors.ConfigError, match="multiple-choice"):
    trainer.run(
        kind="pretrain", model_dir=str(tmp_path / "run"),
        model_config=trainer.ModelConfig(size="tiny", overrides={"vocab_size": 259}),
        adapter_config=adapters.AdapterConfig(mode="poly", n_skills=2, lora_rank=1),
        data_config=trainer.DataConfig(mixture="synthetic_pretrain", batch_size=8),
        train_config=trainer.TrainConfig(steps=1, loss="tfew"))


def test_template_evaluation_tasks_carry_the_fewshot_routing_name(tmp_path, isolated_registry):
  """Every per-template evaluation task of a few-shot preset (EVAL_TASKS t0_rte_fewshot_eval)
  carries task_name = t0_rte_fewshot, the one routing row the dataset was fine-tuned in (the
  authors give every example ds_id=0); the plain per-template tasks keep their own names."""
  from mhr_jax import data

  _write_fixture(tmp_path)
  t0.register_t0(tmp_path, datasets=["rte"], shots=32)
  evals = seqio.get_mixture_or_task(t0.fewshot_eval_mixture("rte")).tasks
  assert len(evals) == 2
  for task in evals:
    names = {ex["task_name"] for ex in data.get_examples(task.name, "validation")
             .as_numpy_iterator()}
    assert names == {b"t0_rte_fewshot"}, task.name
  plain = seqio.get_mixture_or_task("t0_rte").tasks[0].name
  assert {ex["task_name"] for ex in data.get_examples(plain, "validation").as_numpy_iterator()
          } == {plain.encode()}
