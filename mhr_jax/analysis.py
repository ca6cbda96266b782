"""What a run learned: gradient alignment between tasks, routing, learning curves (PNG plots).

    python -m mhr_jax.analysis RUN_DIR [RUN_DIR ...] [--compare OUT_DIR] [--max_tasks 16]

For each run directory it writes into ``RUN_DIR/analysis/``:

* ``learning_curve.png`` from ``metrics.jsonl`` (any run);
* for a run with adapters and several kept checkpoints, ``gradient_alignment.{png,jsonl}``: at
  each checkpoint, the cosine similarity between the gradients of different training tasks with
  respect to the adapter (skill) parameters, and its mean over task pairs. Caccia et al. (2023,
  "Multi-Head Adapter Routing for Cross-Task Generalization", NeurIPS) measure gradient alignment
  between tasks during multi-task pre-training this way and report it higher for MHR than for
  the other methods. Each task's gradient is taken on a fixed batch of its training examples,
  without dropout or routing noise; routing logits are left out, since each task has its own row;
  every method is measured on the same parameters, the adapters;
* for a routed run (Poly, MHR), ``routing_heatmaps.png`` (one panel per adapted layer: tasks x
  (head, skill) mixing weights), ``task_similarity.png`` (cosine similarity of the tasks'
  mixing weights over all layers) and ``routing_entropy.{png,jsonl}`` (mean entropy of each
  head's skill distribution over training, divided by log K: 1 is uniform).

It reads the run's checkpoints (``checkpoints.CheckpointManager``), its ``metrics.jsonl``, and
the ``stage.json`` an experiment pipeline writes (mixture and lengths); without one, give
``--feature_lengths``. The run's training tasks must be registered in this process, as the
default synthetic ones are at import. ``--compare`` draws the runs' learning curves, alignment and
entropy in one figure each.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhr_jax import adapters, checkpoints, data, models, network, trainer

# ----------------------------------------------------------------------------------------------
# Pure measures.


def task_gradients(model: network.T5, batches: Mapping[str, dict], filter_=adapters.AdapterParam,
                   *, jit: bool = True) -> np.ndarray:
  """Each task's loss gradient with respect to the ``filter_`` parameters, flattened: (T, P).

  ``batches`` maps task name to a batch (seqio encoder-decoder features and ``task_ids``);
  no dropout and no routing noise (``deterministic=True``). ``jit=False`` runs op by op (no
  compilation: quicker for a few small batches).
  """
  graphdef, params, rest = nnx.split(model, filter_, ...)
  if not jax.tree.leaves(params):
    raise ValueError("the model has no parameters of the requested kind (no adapters?)")
  grad = _flat_grad(graphdef) if jit else _flat_grad.__wrapped__(graphdef, jit=False)
  rows = [grad(params, rest, {k: jnp.asarray(v) for k, v in b.items()}) for b in batches.values()]
  return np.stack([np.asarray(r, np.float64) for r in rows])  # (T, P)


@functools.lru_cache(maxsize=8)
def _flat_grad(graphdef, jit: bool = True):
  """The flattened loss gradient of one model structure (jitted: compiled once per structure)."""

  def grad(params, rest, batch):
    def loss(p):
      return models.loss_fn(nnx.merge(graphdef, p, rest), batch, deterministic=True)[0]
    g = jax.grad(loss)(params)
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])  # -> (P,)

  return jax.jit(grad) if jit else grad


def cosine_matrix(vectors: np.ndarray, eps: float = 1e-30) -> np.ndarray:
  """Pairwise cosine similarity of the rows of ``vectors`` (T, P) -> (T, T)."""
  v = np.asarray(vectors, np.float64)
  norms = np.linalg.norm(v, axis=1, keepdims=True)
  unit = v / np.maximum(norms, eps)
  return unit @ unit.T  # (T, P) @ (P, T) -> (T, T)


def mean_off_diagonal(matrix: np.ndarray) -> float:
  """Mean of the entries off the diagonal (the mean over distinct task pairs)."""
  n = matrix.shape[0]
  if n < 2:
    raise ValueError("alignment needs at least 2 tasks")
  return float((matrix.sum() - np.trace(matrix)) / (n * (n - 1)))


def routing_weights(model: nnx.Module) -> dict[str, np.ndarray]:
  """Noiseless mixing weights of every task at every routed layer: ``{path: (T, S, K)}``."""
  out = {}
  for path, layer in adapters.adapter_slots(model):
    adapter = layer.adapter
    if isinstance(adapter, adapters.RoutedLoRA):
      router = adapter.router
      ids = jnp.arange(router.n_tasks, dtype=jnp.int32)
      out[path] = np.asarray(router(ids, deterministic=True))  # (T, S, K)
  return out


def routing_entropy(weights: Mapping[str, np.ndarray]) -> float:
  """Mean over layers, tasks and heads of the skill distribution's entropy / log K (1: uniform)."""
  values = []
  for w in weights.values():
    k = w.shape[-1]
    p = np.clip(w, 1e-12, 1.0)
    values.append((-(p * np.log(p)).sum(-1) / np.log(k)).ravel())  # (T, S) -> (T*S,)
  if not values:
    raise ValueError("the model has no routed adapters")
  return float(np.mean(np.concatenate(values)))


def task_similarity(weights: Mapping[str, np.ndarray]) -> np.ndarray:
  """Cosine similarity of the tasks' mixing weights, concatenated over layers: (T, T)."""
  flat = [w.reshape(w.shape[0], -1) for w in weights.values()]  # (T, S, K) -> (T, S*K)
  return cosine_matrix(np.concatenate(flat, axis=1))


# ----------------------------------------------------------------------------------------------
# Runs and checkpoints.


def read_stage(run_dir: pathlib.Path) -> dict:
  """The run's ``stage.json`` (written by experiment pipelines), or {}."""
  path = run_dir / "stage.json"
  return json.loads(path.read_text()) if path.exists() else {}


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
  manager = checkpoints.CheckpointManager(str(run_dir / "checkpoints"), async_save=False)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def load_model(run_dir: pathlib.Path, step: int) -> tuple[network.T5, dict]:
  """The run's model with its trainable state of checkpoint ``step``, and that step's metadata.

  Reads pre-training runs (and any run without vmapped copies); the backbone comes from the
  run's ``backbone_run`` or Hugging Face checkpoint.
  """
  manager = checkpoints.CheckpointManager(str(run_dir / "checkpoints"), async_save=False)
  try:
    meta = manager.metadata(step)
    if meta.get("copies"):
      raise ValueError(f"{run_dir} is a vmapped fine-tuning run (one state per task); the model "
                       "analyses read pre-training runs")
    model_cfg = trainer.ModelConfig(**meta["model_config"])
    adapter_cfg = meta.get("adapter_config") or None
    factory = (adapters.make_adapter_factory(adapters.AdapterConfig(**adapter_cfg))
               if adapter_cfg else None)
    model = network.T5(model_cfg.t5_config(), rngs=nnx.Rngs(params=0, dropout=1, routing=2),
                       adapter_factory=factory)
    if model_cfg.backbone_run:
      checkpoints.restore_into(model, model_cfg.backbone_run, adapters.BACKBONE)
    elif model_cfg.hf_checkpoint:
      from mhr_jax import hf_import

      tensors = hf_import.read_safetensors_dir(model_cfg.hf_checkpoint)
      hf_import.assign_backbone(model, hf_import.hf_to_params(model.config, tensors))
    state = nnx.state(model, adapters.trainable_filter(meta["mode"]))
    new, report = manager.restore_partial(step, state)
  finally:
    manager.close()
  if report.not_loaded or report.shape_mismatch:
    raise checkpoints.CheckpointMismatchError(
        f"{run_dir} step {step} does not fit the model rebuilt from its metadata: "
        f"{report.summary()}")
  nnx.update(model, new)
  return model, meta


def fixed_batches(task_names: Sequence[str], table: data.TaskIdTable,
                  feature_lengths: Mapping[str, int], n_examples: int) -> dict[str, dict]:
  """The first ``n_examples`` training examples of each task, in file order, as one batch."""
  out = {}
  for name in task_names:
    it = data.BatchIterator(name, table, feature_lengths, n_examples, split="train",
                            shuffle=False, num_epochs=1, drop_remainder=False)
    out[name] = next(it)
  return out


def _tasks_of(meta: dict, max_tasks: int) -> tuple[data.TaskIdTable, list[str]]:
  table = meta["task_table"]
  names = sorted(table, key=table.get)
  pick = np.unique(np.linspace(0, len(names) - 1, min(max_tasks, len(names))).round().astype(int))
  return data.TaskIdTable(tuple(names)), [names[i] for i in pick]


def over_training(run_dir: pathlib.Path, feature_lengths: Optional[Mapping[str, int]] = None, *,
                  max_tasks: int = 16, n_examples: int = 32) -> dict:
  """Gradient alignment and (for routed runs) routing entropy at every kept checkpoint."""
  lengths = feature_lengths or read_stage(run_dir).get("feature_lengths")
  if not lengths:
    raise ValueError(f"{run_dir} has no stage.json: give the feature lengths "
                     "(--feature_lengths INPUTS,TARGETS)")
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint in {run_dir / 'checkpoints'}")
  out = {"steps": [], "mean_cosine": [], "entropy": [], "tasks": None, "last_matrix": None}
  batches = None
  for step in steps:
    model, meta = load_model(run_dir, step)
    if batches is None:
      table, names = _tasks_of(meta, max_tasks)
      batches = fixed_batches(names, table, lengths, n_examples)
      out["tasks"] = names
    matrix = cosine_matrix(task_gradients(model, batches))
    out["steps"].append(step)
    out["mean_cosine"].append(mean_off_diagonal(matrix))
    out["last_matrix"] = matrix.tolist()
    weights = routing_weights(model)
    if weights:
      out["entropy"].append(routing_entropy(weights))
  return out


def learning_curve(run_dir: pathlib.Path, split: str = "train", key: str = "loss"
                   ) -> tuple[list[int], list[float]]:
  """``(steps, values)`` of one metric from ``metrics.jsonl`` (the last value of a step wins)."""
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
  points = {}
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if row.get("split") == split and key in row:
      points[int(row["step"])] = float(row[key])
  steps = sorted(points)
  return steps, [points[s] for s in steps]


# ----------------------------------------------------------------------------------------------
# Plots.


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_lines(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: pathlib.Path,
               *, title: str, xlabel: str, ylabel: str) -> pathlib.Path:
  """One line per curve ``{label: (x, y)}``, saved as a PNG."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (x, y) in curves.items():
    ax.plot(x, y, marker="o" if len(x) < 20 else None, label=label)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  if len(curves) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_matrix(matrix: np.ndarray, labels: Sequence[str], path: pathlib.Path, *, title: str,
                vmin: float = -1.0, vmax: float = 1.0) -> pathlib.Path:
  """A labelled square heatmap (task x task), saved as a PNG."""
  plt = _pyplot()
  n = len(labels)
  fig, ax = plt.subplots(figsize=(2 + 0.3 * n, 1.5 + 0.3 * n))
  im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="RdBu_r")
  ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
  ax.set_yticks(range(n), labels, fontsize=6)
  ax.set_title(title)
  fig.colorbar(im, ax=ax, shrink=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_routing(weights: Mapping[str, np.ndarray], path: pathlib.Path) -> pathlib.Path:
  """One panel per adapted layer: tasks (rows) x heads and skills (columns), weights in [0, 1]."""
  plt = _pyplot()
  n = len(weights)
  cols = min(6, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
  for ax, (layer, w) in zip(axes.ravel(), weights.items()):
    ax.imshow(w.reshape(w.shape[0], -1), vmin=0.0, vmax=1.0, aspect="auto", cmap="viridis")
    ax.set_title(layer.replace("/layers_", " ").replace("attention/", ""), fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  fig.suptitle("routing weights: tasks (rows) x heads * skills (columns)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# Whole runs.


def _labels(names: Sequence[str]) -> list[str]:
  """Short task labels: the composition of a synthetic task, else the name."""
  from tasks import synthetic

  known = {name: comp for prefix in synthetic.NAMES.values() for name, comp in prefix.items()}
  return [">".join(known[n]) if n in known else n for n in names]


def analyse_run(run_dir, *, feature_lengths: Optional[Mapping[str, int]] = None,
                max_tasks: int = 16, n_examples: int = 32, alignment: bool = True) -> dict:
  """Writes ``RUN_DIR/analysis/*``; returns ``{"files": [...], "over_training": ...}``."""
  run_dir = pathlib.Path(run_dir)
  out_dir = run_dir / "analysis"
  out_dir.mkdir(exist_ok=True)
  files = [plot_lines({run_dir.name: learning_curve(run_dir)}, out_dir / "learning_curve.png",
                      title=f"{run_dir.name}: training loss", xlabel="step", ylabel="loss")]
  result = {"files": files, "over_training": None}
  steps = checkpoint_steps(run_dir) if (run_dir / "checkpoints").is_dir() else []
  if not steps:
    return result
  model, meta = load_model(run_dir, steps[-1])
  weights = routing_weights(model)
  if weights:
    table = meta["task_table"]
    labels = _labels(sorted(table, key=table.get))
    files.append(plot_routing(weights, out_dir / "routing_heatmaps.png"))
    files.append(plot_matrix(task_similarity(weights), labels, out_dir / "task_similarity.png",
                             title=f"{run_dir.name}: task similarity (routing)", vmin=0.0))
  if alignment and meta.get("adapter_config"):
    curves = over_training(run_dir, feature_lengths, max_tasks=max_tasks, n_examples=n_examples)
    result["over_training"] = curves
    with open(out_dir / "over_training.jsonl", "w") as f:
      for i, step in enumerate(curves["steps"]):
        row = {"step": step, "gradient_alignment": curves["mean_cosine"][i]}
        if curves["entropy"]:
          row["routing_entropy"] = curves["entropy"][i]
        f.write(json.dumps(row) + "\n")
    files.append(plot_lines({run_dir.name: (curves["steps"], curves["mean_cosine"])},
                            out_dir / "gradient_alignment.png", title="gradient alignment",
                            xlabel="step", ylabel="mean cosine over task pairs"))
    files.append(plot_matrix(np.asarray(curves["last_matrix"]), _labels(curves["tasks"]),
                             out_dir / "gradient_cosines.png",
                             title=f"{run_dir.name}: task gradient cosines (last checkpoint)"))
    if curves["entropy"]:
      files.append(plot_lines({run_dir.name: (curves["steps"], curves["entropy"])},
                              out_dir / "routing_entropy.png", title="routing entropy",
                              xlabel="step", ylabel="entropy / log K"))
  return result


def compare_runs(run_dirs: Sequence, out_dir, **kwargs) -> dict:
  """``analyse_run`` on each run, and their curves side by side in ``out_dir``.

  Returns ``{"plots": {title: file name in out_dir}, "alignment": {run: curves}}``.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  runs = [pathlib.Path(r) for r in run_dirs]
  results = {r.name: analyse_run(r, **kwargs) for r in runs}
  plots = {"Training loss": plot_lines(
      {r.name: learning_curve(r) for r in runs}, out_dir / "learning_curves.png",
      title="training loss", xlabel="step", ylabel="loss").name}
  curves = {n: res["over_training"] for n, res in results.items() if res["over_training"]}
  if curves:
    plots["Gradient alignment during pre-training"] = plot_lines(
        {n: (c["steps"], c["mean_cosine"]) for n, c in curves.items()},
        out_dir / "gradient_alignment.png", title="gradient alignment between tasks",
        xlabel="step", ylabel="mean cosine over task pairs").name
    entropy = {n: (c["steps"], c["entropy"]) for n, c in curves.items() if c["entropy"]}
    if entropy:
      plots["Routing entropy during pre-training"] = plot_lines(
          entropy, out_dir / "routing_entropy.png", title="routing entropy", xlabel="step",
          ylabel="entropy / log K").name
  for r in runs:
    for name, title in (("routing_heatmaps.png", "Routing weights per layer"),
                        ("task_similarity.png", "Task similarity from the learned routing")):
      if (r / "analysis" / name).exists():
        target = out_dir / f"{r.name}_{name}"
        target.write_bytes((r / "analysis" / name).read_bytes())
        plots[f"{title} ({r.name})"] = target.name
  alignment = {n: {"steps": c["steps"], "mean_cosine": c["mean_cosine"]}
               for n, c in curves.items()}
  return {"plots": plots, "alignment": alignment}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mhr_jax.analysis", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", help="run directories (MODEL_DIR)")
  parser.add_argument("--compare", help="also draw the runs side by side into this folder")
  parser.add_argument("--max_tasks", type=int, default=16, help="tasks in gradient alignment")
  parser.add_argument("--examples", type=int, default=32, help="examples per task's gradient")
  parser.add_argument("--feature_lengths", help="INPUTS,TARGETS (when the run has no stage.json)")
  parser.add_argument("--no_alignment", action="store_true", help="skip gradient alignment")
  args = parser.parse_args(argv)
  lengths = None
  if args.feature_lengths:
    inputs, targets = (int(x) for x in args.feature_lengths.split(","))
    lengths = {"inputs": inputs, "targets": targets}
  kwargs = dict(feature_lengths=lengths, max_tasks=args.max_tasks, n_examples=args.examples,
                alignment=not args.no_alignment)
  for run in args.run_dirs:
    if not pathlib.Path(run).is_dir():
      parser.error(f"not a run directory: {run}")
  if args.compare:
    out = compare_runs(args.run_dirs, args.compare, **kwargs)
    print(json.dumps(out["plots"], indent=1))
  else:
    for run in args.run_dirs:
      print(run, [str(f) for f in analyse_run(run, **kwargs)["files"]])
  return 0


if __name__ == "__main__":
  sys.exit(main())
