"""An embedded synthetic benchmark of composed string skills, generated in code from a seed.

Why it exists: it lets the whole method (train a small backbone, pre-train routed adapters on a
multi-task mixture, adapt to held-out tasks from a few examples, evaluate) run in minutes on a CPU
with no download and no vocabulary file (byte vocabulary, `seqio.ByteVocabulary`).

Generator (see also ``docs/synthetic_benchmark.md``):

* Inputs are random strings over the first ``alphabet_size`` lowercase letters, of length
  ``min_length``..``max_length``.
* A *primitive skill* is a string transformation (`PRIMITIVES`: reverse, sort, rotate, shift
  letters, swap adjacent pairs, drop every second character, ...); the first ``n_primitives`` are
  used.
* A *task* applies ``min_depth``..``max_depth`` distinct primitives in order. Its input carries no
  hint of the task: the task reaches the model only through its task id, so routing has to pick the
  skills. In the *described* variant (``SyntheticConfig.described``) every composed task's input
  starts with its composition, ``"reverse, shift: abc"``, as a T0 prompt names its task; only there
  can a model that never saw a held-out task's data (zero-shot) know what to compute.
* Training tasks and held-out tasks are disjoint sets of compositions. Every primitive of a held-out
  task occurs in some training task, but the held-out composition (as a function, not only as a
  sequence of names) never does: all tasks are checked to compute different functions on a fixed set
  of probe inputs, and to differ from the identity and from every single primitive. A method that
  learns reusable skills can therefore assemble a held-out task from parts it has seen; a model that
  sees only the few shots of a held-out task cannot.
* Held-out tasks have few-shot splits: ``train`` (``n_shots``), ``validation`` and ``test``, drawn
  from one pool of distinct inputs, so no input is in two splits.
* *Primitive-skill tasks* (one per primitive, input ``"<name>: <string>"``) train the small backbone
  itself in full before it is frozen; unlike composed tasks they name their skill in the input.

Registered (for the default `SyntheticConfig`, at import): ``synthetic_compose_NNN_v1`` (training
compositions; splits train / validation), ``synthetic_heldout_NNN_v1`` (train / validation / test),
``synthetic_primitive_<name>_v1`` (train / validation), and the mixtures ``synthetic_pretrain``,
``synthetic_heldout`` and ``synthetic_primitives``; the described variant of the same tasks under
the prefix ``synthetic_described``. Metric: exact match of the generated string.
"""

from __future__ import annotations

import dataclasses
import itertools
import string
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from tasks import common

VERSION = "v1"
VOCABULARY = seqio.ByteVocabulary()
OUTPUT_FEATURES = {
  "inputs": seqio.Feature(VOCABULARY, add_eos=True),
  "targets": seqio.Feature(VOCABULARY, add_eos=True),
}


# ----------------------------------------------------------------------------- primitives


def _riffle(s: str) -> str:
  half = (len(s) + 1) // 2
  a, b = s[:half], s[half:]
  return "".join(x + y for x, y in itertools.zip_longest(a, b, fillvalue=""))


def _swap_pairs(s: str) -> str:
  chars = list(s)
  for i in range(0, len(chars) - 1, 2):
    chars[i], chars[i + 1] = chars[i + 1], chars[i]
  return "".join(chars)


def _dedupe(s: str) -> str:
  return "".join(c for i, c in enumerate(s) if i == 0 or c != s[i - 1])


def _shift(s: str, alphabet: str) -> str:
  return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in s)


def _mirror_letters(s: str, alphabet: str) -> str:
  return "".join(alphabet[len(alphabet) - 1 - alphabet.index(c)] for c in s)


# name -> f(string, alphabet) -> string. The order fixes which primitives `n_primitives` selects.
PRIMITIVES: dict[str, Callable[[str, str], str]] = {
  "reverse": lambda s, a: s[::-1],
  "sort": lambda s, a: "".join(sorted(s)),
  "rotate": lambda s, a: s[1:] + s[:1],
  "shift": _shift,
  "swap_pairs": lambda s, a: _swap_pairs(s),
  "drop_odd": lambda s, a: s[::2],
  "mirror_letters": _mirror_letters,
  "riffle": lambda s, a: _riffle(s),
  "dedupe": lambda s, a: _dedupe(s),
  "append_first": lambda s, a: s + s[:1],
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """The knobs of the synthetic benchmark; the defaults are the registered benchmark.

  Attributes:
    n_primitives: number of primitive skills used (the first ones of `PRIMITIVES`).
    min_depth: fewest primitives in a composed task.
    max_depth: most primitives in a composed task.
    n_train_tasks: composed tasks in the pre-training mixture.
    n_heldout_tasks: composed tasks held out for few-shot adaptation.
    train_examples: training examples per pre-training task.
    validation_examples: validation examples per pre-training and per primitive-skill task.
    primitive_examples: training examples per primitive-skill task (backbone training).
    n_shots: training examples per held-out task.
    heldout_validation: validation examples per held-out task.
    heldout_test: test examples per held-out task.
    alphabet_size: letters the input strings are drawn from.
    min_length: shortest input string.
    max_length: longest input string (targets are at most ``max_length + max_depth`` bytes).
    n_probes: probe inputs used to check that all tasks compute different functions.
    seed: everything (task choice, examples) is a function of this seed and the other knobs.
    described: composed tasks' inputs start with their composition (``describe``); the tasks and
      strings are those of the same configuration without it.
  """

  n_primitives: int = 10
  min_depth: int = 2
  max_depth: int = 2
  n_train_tasks: int = 48
  n_heldout_tasks: int = 8
  train_examples: int = 1000
  validation_examples: int = 64
  primitive_examples: int = 2000
  n_shots: int = 64
  heldout_validation: int = 32
  heldout_test: int = 256
  alphabet_size: int = 10
  min_length: int = 3
  max_length: int = 5
  n_probes: int = 256
  seed: int = 0
  described: bool = False

  def __post_init__(self):
    if not 2 <= self.n_primitives <= len(PRIMITIVES):
      raise ValueError(f"n_primitives must be in 2..{len(PRIMITIVES)}, got {self.n_primitives}")
    if not 1 <= self.min_depth <= self.max_depth <= self.n_primitives:
      raise ValueError(f"need 1 <= min_depth <= max_depth <= n_primitives: {self}")
    if not 2 <= self.alphabet_size <= 26 or not 1 <= self.min_length <= self.max_length:
      raise ValueError(f"bad alphabet_size or lengths: {self}")

  @property
  def alphabet(self) -> str:
    return string.ascii_lowercase[: self.alphabet_size]

  @property
  def primitive_names(self) -> tuple[str, ...]:
    return tuple(PRIMITIVES)[: self.n_primitives]

  def longest(self) -> dict[str, int]:
    """Upper bounds on the examples' lengths in tokens (bytes), EOS included.

    ``inputs``: primitive-skill inputs (``"<name>: <string>"``) and undescribed composed inputs;
    ``described_inputs``: those and the described variant's (``"<name>, <name>: <string>"``);
    ``targets``: every target (a primitive adds at most one character: ``append_first``).
    Sequence lengths below these would truncate examples, and exact match with them.
    """
    names = sorted((len(n) for n in self.primitive_names), reverse=True)
    prefix = max(names[0] + 2, sum(names[: self.max_depth]) + 2 * self.max_depth)
    inputs = names[0] + 2 + self.max_length + 1
    return {"inputs": inputs, "described_inputs": max(inputs, prefix + self.max_length + 1),
            "targets": self.max_length + self.max_depth + 1}


def describe(composition: Sequence[str]) -> str:
  """The textual description of a task that prefixes its inputs: ``"reverse, shift"``."""
  return ", ".join(composition)


def apply(composition: Sequence[str], s: str, alphabet: str) -> str:
  """Applies the primitives of ``composition`` to ``s``, first to last."""
  for name in composition:
    s = PRIMITIVES[name](s, alphabet)
  return s


def _random_strings(rng: np.random.Generator, n: int, config: SyntheticConfig) -> list[str]:
  lengths = rng.integers(config.min_length, config.max_length + 1, size=n)
  letters = np.array(list(config.alphabet))
  return ["".join(rng.choice(letters, size=k)) for k in lengths]


def _distinct_strings(rng: np.random.Generator, n: int, config: SyntheticConfig) -> list[str]:
  out, seen = [], set()
  for _ in range(100):
    for s in _random_strings(rng, n, config):
      if s not in seen:
        seen.add(s)
        out.append(s)
        if len(out) == n:
          return out
  raise ValueError(f"Cannot draw {n} distinct strings with {config}; raise max_length or alphabet")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """The chosen compositions of one configuration, and their example generator."""

  config: SyntheticConfig
  train: tuple[tuple[str, ...], ...]
  heldout: tuple[tuple[str, ...], ...]
  probes: tuple[str, ...]

  def signature(self, composition: Sequence[str]) -> tuple[str, ...]:
    """The outputs of a composition on the probe inputs (its function, as far as tests can see)."""
    return tuple(apply(composition, s, self.config.alphabet) for s in self.probes)

  def examples(self, kind: str, index: int, split: str) -> dict[str, list[str]]:
    """Inputs and targets of one task split. ``kind`` is "compose", "heldout" or "primitive"."""
    c = self.config
    if kind == "primitive":
      composition = (c.primitive_names[index],)
      sizes = {"train": c.primitive_examples, "validation": c.validation_examples}
    elif kind == "compose":
      composition = self.train[index]
      sizes = {"train": c.train_examples, "validation": c.validation_examples}
    elif kind == "heldout":
      composition = self.heldout[index]
      sizes = {"train": c.n_shots, "validation": c.heldout_validation, "test": c.heldout_test}
    else:
      raise ValueError(f"Unknown kind {kind!r}; expected compose, heldout or primitive")
    if split not in sizes:
      raise ValueError(f"{kind} tasks have splits {list(sizes)}, not {split!r}")
    kind_code = ("primitive", "compose", "heldout").index(kind)
    rng = np.random.default_rng([c.seed, 1 + kind_code, index])
    pool = _distinct_strings(rng, sum(sizes.values()), c)
    start = 0
    for name, size in sizes.items():
      if name == split:
        break
      start += size
    inputs = pool[start : start + sizes[split]]
    targets = [apply(composition, s, c.alphabet) for s in inputs]
    if kind == "primitive" or c.described:
      inputs = [f"{describe(composition)}: {s}" for s in inputs]
    return {"inputs": inputs, "targets": targets}


def build(config: SyntheticConfig = SyntheticConfig()) -> Benchmark:
  """Chooses the training and held-out compositions of ``config`` (deterministic in its seed)."""
  prims = config.primitive_names
  probes = tuple(_random_strings(np.random.default_rng([config.seed, 0]), config.n_probes, config))
  partial = Benchmark(config, (), (), probes)
  candidates = [
    comp
    for depth in range(config.min_depth, config.max_depth + 1)
    for comp in itertools.permutations(prims, depth)
  ]
  order = np.random.default_rng([config.seed, 100]).permutation(len(candidates))
  taken = {partial.signature(()): "identity"}
  for p in prims:
    sig = partial.signature((p,))
    if sig in taken:
      raise ValueError(f"Primitive {p!r} computes the same function as {taken[sig]!r}")
    taken[sig] = p
  train, heldout, rest = [], [], []
  for i in order:
    comp = candidates[i]
    sig = partial.signature(comp)
    if sig in taken:
      continue  # Same function as a primitive or an earlier task, e.g. (sort, reverse, sort).
    if len(train) < config.n_train_tasks:
      train.append(comp)
      taken[sig] = comp
    else:
      rest.append((comp, sig))
  seen_prims = {p for comp in train for p in comp}
  for comp, sig in rest:
    if len(heldout) == config.n_heldout_tasks:
      break
    if set(comp) <= seen_prims and sig not in taken:
      heldout.append(comp)
      taken[sig] = comp
  if len(train) < config.n_train_tasks or len(heldout) < config.n_heldout_tasks:
    raise ValueError(
      f"Only {len(train)} training and {len(heldout)} held-out compositions with distinct "
      "functions "
      f"exist for {config}; lower n_train_tasks / n_heldout_tasks or raise n_primitives / max_depth"
    )
  return Benchmark(config, tuple(train), tuple(heldout), probes)


# ----------------------------------------------------------------------------- registration


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Seqio metric: percentage of predictions equal to their target string."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  hits = [common.as_text(t) == common.as_text(p) for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits)) if hits else float("nan")}


def _register_task(name: str, bench: Benchmark, kind: str, index: int, splits: Mapping[str, int]):
  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # Examples are generated in a fixed order; seqio shuffles them.
    ex = bench.examples(kind, index, split)
    return tf.data.Dataset.from_tensor_slices(ex)

  seqio.TaskRegistry.add(
    name,
    source=seqio.FunctionDataSource(dataset_fn, splits=list(splits), num_input_examples=splits),
    preprocessors=[
      common.add_task_name(name),
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=OUTPUT_FEATURES,
    metric_fns=[exact_match],
    shuffle_buffer_size=max(splits.values()),  # The whole split: a larger buffer only delays.
  )


_REGISTERED: dict[str, SyntheticConfig] = {}
NAMES: dict[str, dict[str, tuple[str, ...]]] = {}


def register_synthetic(config: SyntheticConfig = SyntheticConfig(), prefix: str = "synthetic"):
  """Registers the tasks and mixtures of ``config`` under ``prefix`` (idempotent).

  Returns:
    A dict ``{task name: composition}`` of the registered composed and primitive tasks.
  """
  if prefix in _REGISTERED:
    if _REGISTERED[prefix] != config:
      raise ValueError(
        f"Synthetic tasks with prefix {prefix!r} are already registered with "
        f"{_REGISTERED[prefix]}; "
        "use another prefix for another configuration"
      )
    return NAMES[prefix]
  bench = build(config)
  c = config
  names: dict[str, tuple[str, ...]] = {}
  groups: dict[str, list[str]] = {"pretrain": [], "heldout": [], "primitives": []}
  for i, comp in enumerate(bench.train):
    name = f"{prefix}_compose_{i:03d}_{VERSION}"
    _register_task(name, bench, "compose", i, {"train": c.train_examples,
                                               "validation": c.validation_examples})
    names[name] = comp
    groups["pretrain"].append(name)
  for i, comp in enumerate(bench.heldout):
    name = f"{prefix}_heldout_{i:03d}_{VERSION}"
    splits = {"train": c.n_shots, "validation": c.heldout_validation, "test": c.heldout_test}
    _register_task(name, bench, "heldout", i, splits)
    names[name] = comp
    groups["heldout"].append(name)
  for i, prim in enumerate(c.primitive_names):
    name = f"{prefix}_primitive_{prim}_{VERSION}"
    _register_task(name, bench, "primitive", i, {"train": c.primitive_examples,
                                                 "validation": c.validation_examples})
    names[name] = (prim,)
    groups["primitives"].append(name)
  for group, tasks in groups.items():
    seqio.MixtureRegistry.add(f"{prefix}_{group}", tasks, default_rate=1.0)
  _REGISTERED[prefix] = config
  NAMES[prefix] = names
  return names


register_synthetic()
register_synthetic(SyntheticConfig(described=True), prefix="synthetic_described")
