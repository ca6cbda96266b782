"""T0 held-out tasks: promptsource rendering, labels, rank classification, bad input."""

import json

import numpy as np
import pytest
import seqio

from mhr_jax import choices, data
from tasks import t0


@pytest.fixture(scope="module")
def root(shared_data):
  if not (shared_data / "t0_heldout").is_dir() or not (shared_data / "tokenizer").is_dir():
    pytest.skip(f"T0 data or tokenizer not under {shared_data}")
  return shared_data


@pytest.fixture(scope="module")
def names(root):
  return t0.register_t0(root)


def _template(root, spec_name, template_name):
  spec = t0.DATASETS[spec_name]
  path = root / "promptsource_templates" / spec.templates / "templates.yaml"
  return spec, next(t for t in t0.load_templates(path) if t.name == template_name)


def test_one_task_per_original_template(names):
  # T0's evaluation prompts: templates marked original_task with answer choices.
  assert {k: len(v) for k, v in names.items() if k in ("rte", "cb", "copa", "wic", "wsc")} == {
    "rte": 10, "cb": 15, "copa": 12, "wic": 10, "wsc": 10}
  assert "t0_rte_mnli_crowdsource" in names["rte"]
  task = seqio.get_mixture_or_task("t0_rte_mnli_crowdsource")
  assert set(task.splits) == {"train", "validation"}
  assert len(seqio.get_mixture_or_task("t0_heldout").tasks) == sum(map(len, names.values()))


def test_registration_is_idempotent(root, names):
  assert t0.register_t0(root) is names
  with pytest.raises(ValueError, match="already registered"):
    t0.register_t0(root, fewshot_seed=0)


def test_rte_prompt_matches_promptsource(root):
  spec, tpl = _template(root, "rte", "MNLI crowdsource")
  ex = t0.render_file(root / "t0_heldout/eval/super_glue/RTE/val.jsonl", spec, tpl)[0]
  assert ex["inputs"] == (
    "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
    "according to the Christopher Reeve Foundation. Using only the above description and what you "
    'know about the world, is "Christopher Reeve had an accident." definitely correct? Yes or no?')
  # SuperGLUE says "not_entailment", which is index 1 of (entailment, not_entailment) -> "No".
  assert (ex["targets"], ex["answer_choices"], ex["label"]) == ("No", ["Yes", "No"], 1)


def test_copa_prompts_match_promptsource(root):
  val = root / "t0_heldout/eval/super_glue/COPA/val.jsonl"
  spec, tpl = _template(root, "copa", "best_option")
  ex = t0.render_file(val, spec, tpl)[0]
  assert ex["inputs"] == (
    "The man turned on the faucet. \n\nWhat's the best option?\n- The toilet filled with water.\n"
    "- Water flowed from the spout.\n\nWe are looking for  an effect")
  assert ex["answer_choices"] == ["The toilet filled with water.", "Water flowed from the spout."]
  assert ex["targets"] == "Water flowed from the spout." and ex["label"] == 1
  # A template for "cause" questions only: the 48 "effect" rows render empty and are dropped.
  spec, tpl = _template(root, "copa", "\u2026which may be caused by")
  rows = t0.render_file(val, spec, tpl)
  n_cause = sum(json.loads(line)["question"] == "cause" for line in open(val))
  assert len(rows) == n_cause == 52
  assert rows[0]["inputs"] == (
    'The hamburger meat browned. Which may be caused by "The cook froze it." or "The cook grilled '
    'it."?')


def test_labels_of_both_forms_are_normalised(root):
  spec, tpl = _template(root, "cb", "GPT-3 style")
  val = t0.render_file(root / "t0_heldout/eval/super_glue/CB/val.jsonl", spec, tpl)
  raw = [json.loads(x)["label"] for x in open(root / "t0_heldout/eval/super_glue/CB/val.jsonl")]
  assert [ex["label"] for ex in val] == [spec.label_names.index(r) for r in raw]
  few = t0.render_file(t0.fewshot_file(root, spec, None, 42), spec, tpl)
  raw = [json.loads(line)["label"] for line in open(t0.fewshot_file(root, spec, None, 42))]
  assert [ex["label"] for ex in few] == raw and len(few) == 32


def test_wsc_nested_spans_are_flattened(root):
  spec, tpl = _template(root, "wsc", "does the pronoun refer to")
  ex = t0.render_file(root / "t0_heldout/eval/super_glue/WSC/val.jsonl", spec, tpl)[0]
  assert ex["inputs"].endswith('does the pronoun "him" refer to anyone? Yes or no?')
  assert ex["targets"] == "No"


def test_perfect_scorer_gets_100_on_rte_validation(names):
  task = "t0_rte_guaranteed_true"
  table = data.TaskIdTable.from_mixture("t0_rte")
  lengths = {"inputs": 256, "targets": 8}
  examples = list(data.get_examples(task, "validation", lengths).as_numpy_iterator())
  assert len(examples) == 277
  vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
  rows = choices.rank_classification_rows(examples, vocab, table, lengths)
  assert len(rows["example_ids"]) == 2 * 277
  assert set(rows["task_ids"]) == {table.id(task)}
  assert vocab.decode(rows["decoder_target_tokens"][1].tolist()) == "No"
  batches = list(choices.rank_classification_batches(rows, batch_size=64))
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  perfect = np.where(cat["is_correct"] > 0, -0.5, -3.0) * cat["decoder_loss_weights"].sum(1)
  out = choices.rank_classification_predict(perfect, cat["decoder_loss_weights"].sum(1),
                                         cat["example_ids"], cat["choice_ids"], cat["is_correct"])
  assert out["accuracy"] == 100.0 and len(out["predictions"]) == 277
  gold = [seqio.get_mixture_or_task(task).postprocess_fn(None, example=ex, is_target=True)
          for ex in examples]
  assert choices.rank_accuracy(gold, out["predictions"]) == {"accuracy": 100.0}
  assert np.mean(gold) == pytest.approx(131 / 277)  # "not_entailment" rows


def test_fewshot_task_is_one_task_with_a_template_drawn_per_visit(root, names):
  name = t0.fewshot_task("rte")
  assert name == "t0_rte_fewshot" and seqio.get_mixture_or_task(name).splits == ("train",)
  spec = t0.DATASETS["rte"]
  path = t0.fewshot_file(root, spec, 32, 42)
  tpls = [t for t in t0.load_templates(root / "promptsource_templates" / spec.templates /
                                       "templates.yaml") if t.original_task]
  # Every example of the 32-shot file under each of the 10 templates: (row, template) by input.
  where = {r["inputs"]: (i, k) for k, t in enumerate(tpls)
           for i, r in enumerate(t0.render_rows(path, spec, t))}

  def visits(seed):
    exs = data.get_examples(name, "train", shuffle=True, seed=seed, num_epochs=3)
    return [(ex["task_name"], ex["inputs_pretokenized"].decode(), int(ex["label"]))
            for ex in exs.as_numpy_iterator()]

  first = visits(1)
  assert len(first) == 3 * 32 and {v[0] for v in first} == {b"t0_rte_fewshot"}
  seen = [where[text] for _, text, _ in first]
  by_row = {}
  for row, k in seen:
    by_row.setdefault(row, []).append(k)
  assert sorted(by_row) == list(range(32)) and all(len(v) == 3 for v in by_row.values())
  assert sum(len(set(v)) > 1 for v in by_row.values()) > 16  # templates change between visits
  assert len({k for _, k in seen}) == 10
  assert visits(1) == first and visits(2) != first


def test_copa_fewshot_task_draws_from_the_authors_eight_templates(root, names):
  spec = t0.DATASETS["copa"]
  tpls = [t for t in t0.load_templates(root / "promptsource_templates" / spec.templates /
                                       "templates.yaml") if t.original_task]
  kept = t0.training_templates(tpls, spec)
  assert [t.name for t in kept] == sorted(t.name for t in tpls)[:8]
  assert not any(t.name.startswith("\u2026") for t in kept)  # the cause-only/effect-only ones
  path = t0.fewshot_file(root, spec, 32, 42)
  assert all(r is not None for t in kept for r in t0.render_rows(path, spec, t))


def test_fewshot_training_batches_and_routed_evaluation(names):
  table = data.TaskIdTable(("some_pretraining_task", t0.fewshot_task("rte")))
  lengths = {"inputs": 256, "targets": 8}
  assert choices.max_choices(t0.fewshot_task("rte")) == 2
  it = choices.MultipleChoiceIterator(t0.fewshot_task("rte"), table, lengths, 8, 2, seed=0)
  batch = next(it)
  assert batch["encoder_input_tokens"].shape == (16, 256)
  assert set(batch["task_ids"].tolist()) == {1} and batch["is_correct"].sum() == 8
  assert batch["choice_mask"].all()
  # Each template is evaluated through the few-shot task's routing row.
  mixture = seqio.get_mixture_or_task(t0.fewshot_eval_mixture("rte"))
  assert len(mixture.tasks) == 10
  task = mixture.tasks[0].name
  examples = list(data.get_examples(task, "validation", lengths).as_numpy_iterator())[:5]
  rows = choices.rank_classification_rows(examples, seqio.get_mixture_or_task(task)
                                       .output_features["targets"].vocabulary, table, lengths)
  assert set(rows["task_ids"].tolist()) == {1}


def test_shots_pick_the_folder_and_a_missing_one_is_named(root, names):
  assert t0.register_t0(root, datasets=["rte"], shots=32) == {"rte": names["rte"]}
  assert t0.register_t0(root, datasets=["rte"], shots={"rte": 32}) == {"rte": names["rte"]}
  with pytest.raises(FileNotFoundError, match=r"anli-r1/32_shot/42_seed.jsonl"):
    t0.register_t0(root, datasets=["anli_r1"], shots=t0.AUTHORS_SHOTS)


@pytest.mark.slow
def test_mixture_batches_carry_t0_task_ids(names):
  table = data.TaskIdTable.from_mixture("t0_copa")
  it = data.BatchIterator("t0_copa", table, {"inputs": 128, "targets": 16}, batch_size=32, seed=0)
  b = next(it)
  assert b["task_ids"].shape == (32,) and b["task_ids"].max() < table.n_tasks
  assert len(set(b["task_ids"].tolist())) > 3


# ----------------------------------------------------------------------------- bad input


def _mini(tmp_path, lines, jinja="{{premise}} ||| {{ answer_choices[label] }}"):
  spec = t0.DatasetSpec("x", "x", label_names=("entailment", "not_entailment"))
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(lines) + "\n")
  tpl = t0.Template("id0", "mini", jinja, "Yes ||| No", True, "mini.yaml")
  return path, spec, tpl


def test_malformed_json_line_names_file_and_line(tmp_path):
  path, spec, tpl = _mini(tmp_path, ['{"premise": "a", "label": 0}', '{"premise": "b", '])
  with pytest.raises(ValueError, match=r"rows.jsonl:2: malformed JSON"):
    t0.render_file(path, spec, tpl)


def test_template_that_does_not_render(tmp_path):
  path, spec, tpl = _mini(tmp_path, ['{"premise": "a", "label": 0}'],
                          jinja="{{ premise }} {{ missing_field }} ||| x")
  with pytest.raises(ValueError, match=r"'mini'.*does not render .*rows.jsonl:1.*missing_field"):
    t0.render_file(path, spec, tpl)


def test_label_outside_answer_choices(tmp_path):
  rows = ['{"premise": "a", "label": 0}', '{"premise": "b", "label": 2}']
  path, spec, tpl = _mini(tmp_path, rows)
  with pytest.raises(ValueError, match=r"rows.jsonl:2: label 2 is outside the answer choices"):
    t0.render_file(path, spec, tpl)
  path, spec, tpl = _mini(tmp_path, ['{"premise": "a", "label": "maybe"}'])
  with pytest.raises(ValueError, match=r"rows.jsonl:1: label 'maybe' is not one of"):
    t0.render_file(path, spec, tpl)


def test_missing_data_dir_and_unknown_dataset(tmp_path, monkeypatch):
  monkeypatch.delenv(t0.DATA_DIR_ENV, raising=False)
  with pytest.raises(ValueError, match="MHR_DATA_DIR"):
    t0.register_t0()
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    t0.register_t0(tmp_path / "nowhere")
  (tmp_path / "t0_heldout").mkdir()
  with pytest.raises(ValueError, match=r"Unknown T0 datasets \['mnli'\].*'rte'"):
    t0.register_t0(tmp_path, datasets=["mnli"])
