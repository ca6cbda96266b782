"""The generation benchmarks: their inputs and agreement measure, and on the tiny shape one pass
with records well formed and ours (the evaluation's predict_fn) generating the same tokens as
PEFT's ``generate`` on the same weights, greedy and 4 beams (16 s alone on the 2-core machine
lightly loaded, mostly imports and compiling both decoders); the profile's tiny run is marked slow.

No timing is asserted: the figures depend on the machine and its load.
"""

import json

import numpy as np
import pytest

from benchmarks import generation_speed as gs


def test_examples_have_the_shapes_lengths_and_end_with_eos():
  spec = gs.INPUTS["super_ni"]
  inputs, tids = gs.make_examples(spec, 50, vocab_size=100, n_tasks=8)
  lengths = [len(r) for r in inputs]
  assert min(lengths) >= spec.min_input and max(lengths) <= spec.max_input
  assert len(set(lengths)) > 1  # a spread, so buckets and dynamic padding have work to do
  assert all(r[-1] == 1 and 1 not in r[:-1] and 0 not in r for r in inputs)
  assert tids.shape == (50,) and set(tids.tolist()) <= set(range(8))


def test_agreement_counts_tokens_and_whole_sequences():
  a = np.array([[1, 2, 3], [4, 5, 6]])
  b = np.array([[1, 2, 3], [4, 0, 6]])
  assert gs.agreement(a, b) == {"tokens": 5 / 6, "sequences": 0.5}


def test_tiny_run_writes_records_and_both_sides_generate_the_same_tokens(tmp_path, monkeypatch):
  pytest.importorskip("peft")
  # Inputs of 6-8 tokens, one bucket: one compiled program per decoder.
  monkeypatch.setitem(gs.INPUTS, "synthetic", gs.Inputs(6, 8, 4, n_examples=5, batch=4,
                                                        buckets=(8,)))
  assert gs.main(["--inputs", "synthetic", "--shape", "tiny", "--rounds", "1",
                  "--out", str(tmp_path), "--all_cores"]) == 0
  lines = (tmp_path / "generation_speed.jsonl").read_text().splitlines()
  header, *records = [json.loads(line) for line in lines]
  assert "benchmarks.generation_speed" in header["command"] and "cpu_model" in header["machine"]
  (rec,) = records
  variants = {"ours_greedy", "ours_greedy_buckets", "ours_beam4", "ours_beam4_buckets",
              "peft_greedy", "peft_beam4"}
  assert set(rec["pass_s"]) == set(rec["tokens_per_s"]) == variants
  assert all(len(v) == 1 and v[0] > 0 for v in rec["all_pass_s"].values())
  assert (rec["n_examples"], rec["new_tokens"]) == (5, 4)
  # Same weights, no EOS on either side: every variant gives PEFT's tokens, greedy and beams.
  assert set(rec["agreement_with_peft"]) == {v for v in variants if v.startswith("ours")}
  for name, agree in rec["agreement_with_peft"].items():
    assert agree == {"tokens": 1.0, "sequences": 1.0}, name
  table = (tmp_path / "generation_speed.md").read_text()
  assert "| synthetic | 5 x 4 | 4 |" in table


@pytest.mark.slow
def test_tiny_profile_times_every_piece_on_both_sides(tmp_path, monkeypatch):
  pytest.importorskip("peft")
  from benchmarks import generation_profile as gp

  monkeypatch.setitem(gs.INPUTS, "synthetic", gs.Inputs(6, 8, 4, n_examples=5, batch=4,
                                                        buckets=(8,)))
  assert gp.main(["--inputs", "synthetic", "--shape", "tiny", "--rounds", "1",
                  "--out", str(tmp_path), "--all_cores"]) == 0
  header, rec = [json.loads(line)
                 for line in (tmp_path / "generation_profile.jsonl").read_text().splitlines()]
  assert "benchmarks.generation_profile" in header["command"]
  pieces = {"generate_greedy", "generate_beam4", "encode", "step_greedy", "step_beam4",
            "select_beam4"}
  assert set(rec["piece_s"]) == {f"{side}_{p}" for side in ("ours", "peft") for p in pieces}
  assert all(v > 0 for v in rec["piece_s"].values())
  table = (tmp_path / "generation_profile.md").read_text()
  assert "| synthetic | 4 x 8 | 4 | step_beam4 |" in table
