"""benchmarks.finetune_speed and benchmarks.fewshot_job: both sides compute the same T-Few loss
(ours against the PyTorch step of HF T5 + PEFT on the same weights), the job's batches, and
(slow) each module's whole run at the tiny shape with well-formed records."""

import json

import numpy as np
import pytest

from benchmarks import eval_speed, fewshot_job, finetune_speed


@pytest.mark.slow  # ~25 s of CPU (two models, a compiled loss); 170 s wall on the loaded 2 cores
def test_peft_tfew_step_computes_our_tfew_loss(shared_data):
  """On a real CB few-shot batch (3 choices), PEFT's T-Few loss in PyTorch equals
  ``models.tfew_loss_fn`` of ours, same weights, routing noise off on both sides."""
  import torch

  from mhr_jax import models

  adapters_cfg = eval_speed.Adapters(n_tasks=2, n_skills=2, rank=1)
  ours = eval_speed.build_ours("tiny", adapters_cfg)
  peft_model = eval_speed.build_peft(ours, adapters_cfg)
  vocab = finetune_speed.vocabulary(shared_data)
  for task_id, name in [(1, "cb")]:
    examples = finetune_speed.load_fewshot(shared_data, name)[:3]
    c = max(len(e["answer_choices"]) for e in examples)
    batch = finetune_speed.choice_batch(examples, vocab, task_id, c,
                                        {"inputs": 256, "targets": 8})
    assert finetune_speed.real_tokens(batch, c) == (
        sum(len(e["inputs"]) for e in examples) + int((batch["decoder_target_tokens"] > 0).sum()))
    ours_loss, _ = models.tfew_loss_fn(ours, batch, c, deterministic=True)
    trainer = finetune_speed.PeftTrainer(peft_model)
    peft_model.eval()  # no routing noise, as deterministic=True
    with torch.no_grad():
      theirs = finetune_speed.peft_tfew_loss(torch, peft_model,
                                             *trainer.prepare(examples, vocab, task_id, c))
    np.testing.assert_allclose(float(theirs), float(ours_loss), rtol=2e-4)


def test_job_batches_stack_the_tasks_and_cut_to_buckets(shared_data):
  """The vmapped side's step batches: [tasks, examples x choices, L], L a bucket."""
  job = fewshot_job.render_job(shared_data, ("rte", "cb", "anli_r1"), eval_examples=3)
  assert [len(job[d]["eval"]) for d in job] == [3, 3, 3]
  assert all(len(job[d]["train"]) >= 32 for d in job)
  vocab = finetune_speed.vocabulary(shared_data)
  batches = fewshot_job._train_batches(job, vocab, steps=5, n_choices=3)
  assert len(batches) == 5
  for b in batches:
    t, rows, li = b["encoder_input_tokens"].shape
    assert (t, rows) == (3, fewshot_job.BATCH * 3)
    assert li in finetune_speed.BUCKETS["inputs"]
    assert b["decoder_target_tokens"].shape[-1] in finetune_speed.BUCKETS["targets"]
    # RTE has 2 choices: their third row of every example is padding.
    assert b["decoder_loss_weights"][0, 2::3].sum() == 0
    assert b["decoder_loss_weights"][1, 2::3].sum() > 0


@pytest.mark.slow  # two worker processes, compiling the tiny model: ~5 minutes on 2 shared cores
def test_finetune_speed_runs_and_writes_records(shared_data, tmp_path):
  finetune_speed.main(["--shape", "tiny", "--datasets", "copa", "--batches", "1",
                       "--data_dir", str(shared_data), "--out", str(tmp_path), "--all_cores"])
  lines = [json.loads(l) for l in (tmp_path / "finetune_speed.jsonl").read_text().splitlines()]
  assert "command" in lines[0] and lines[0]["machine"]["cpu_model"] is not None
  assert [r["variant"] for r in lines[1:]] == ["ours_fixed", "ours_buckets", "peft_dynamic"]
  for r in lines[1:]:
    assert r["real_tokens_per_s"] > 0 and r["first_step_cold_s"] > 0
  assert lines[1]["first_step_warm_s"] > 0 and lines[3]["first_step_warm_s"] is None
  assert "ours_buckets" in (tmp_path / "finetune_speed.md").read_text()


@pytest.mark.slow  # three processes (ours cold, ours warm, PEFT): ~7 minutes on 2 shared cores
def test_fewshot_job_runs_and_writes_records(shared_data, tmp_path):
  fewshot_job.main(["--shape", "tiny", "--datasets", "rte,winogrande", "--steps", "2",
                    "--eval_examples", "4", "--data_dir", str(shared_data), "--out",
                    str(tmp_path), "--all_cores"])
  lines = [json.loads(l) for l in (tmp_path / "fewshot_job.jsonl").read_text().splitlines()]
  assert [r["variant"] for r in lines[1:]] == ["ours_cold", "ours_warm", "peft"]
  for r in lines[1:]:
    assert r["wall_s"] > sum(r["stages_s"].values()) > 0
    assert sorted(r["accuracy"]) == ["rte", "winogrande"]
  assert "ours_warm" in (tmp_path / "fewshot_job.md").read_text()
