"""The one table of adapter modes and run kinds, and the facts every other module asks of them.

A mode says what a model holds and what trains; a run kind says what a run does with it. The
trainer, the adapters and the optimizers look facts up here (``get_mode``, ``get_kind``) rather
than comparing names, so adding a mode means adding one row below (and, for a new kind of
module, its construction in ``adapters``).

  mode    adapters  routed  trains             starts from (transition)             zero-shot id
  full    none      no      backbone           full (keep)                          0 (ignored)
  lora    LoRA      no      adapters           lora (keep)                          0 (ignored)
  poly    K skills  yes     routing, adapters  poly, mhr (new task rows)            own row
  mhr     K x S     yes     routing, adapters  poly, mhr (new task rows)            own row
  mhr_z   K x S     yes     routing            poly, mhr (new task rows); required  own row
  mhr_mu  LoRA      no      adapters           poly, mhr (average skills), mhr_mu   0 (ignored)
                                               (keep); required

"Zero-shot id": a mode whose output does not depend on the task id evaluates tasks it has no
routing row for (held-out tasks, zero-shot) through id 0; a routed mode needs each task's own row.
"""

from __future__ import annotations

import dataclasses
import enum
from types import MappingProxyType
from typing import Mapping, Optional

from mhr_jax import errors

# Parameter groups a mode may train (``adapters.PARAM_GROUPS`` maps them to nnx filters).
BACKBONE = "backbone"  # every parameter outside an adapter slot
ROUTING = "routing"  # the routing logits of the tasks that train (``RouterParam``)
ADAPTERS = "adapters"  # the LoRA skill inventory (``AdapterParam``)


class Transition(enum.Enum):
  """What happens to a parent run's model when a run starts from it (``TrainConfig.init_from``)."""

  KEEP = "keep"  # the parent's trainable state as it is
  NEW_TASK_ROWS = "new_task_rows"  # routing rows for the run's new tasks; the parent's rows frozen
  AVERAGE_SKILLS = "average_skills"  # each routed adapter becomes the mean of its skills (MHR-mu)


@dataclasses.dataclass(frozen=True)
class Mode:
  """The facts of one adapter mode.

  Attributes:
    name: the mode's name in configs (``AdapterConfig.mode``; ``full`` is ``adapter_config=None``).
    summary: one line for people.
    has_adapters: whether the model carries adapters (False only for ``full``).
    routed: whether its adapters are routed per task (routers over a skill inventory).
    trains: the parameter groups that receive gradients and optimizer state.
    parents: the modes of the runs it may start from, and the transition applied to each.
    needs_parent: whether it can only start from a pre-trained run (MHR-z, MHR-mu).
    task_ids_matter: whether the model's output depends on the task id.
    single_split: whether ``n_splits`` must be 1 (Poly routes whole adapters).
  """

  name: str
  summary: str
  has_adapters: bool
  routed: bool
  trains: frozenset
  parents: Mapping[str, Transition]
  needs_parent: bool = False
  task_ids_matter: bool = False
  single_split: bool = False

  @property
  def zero_shot_task_id(self) -> Optional[int]:
    """The id through which tasks outside the task table are evaluated; None when each task
    needs its own routing row."""
    return None if self.task_ids_matter else 0

  def transition_from(self, parent_mode: str, parent_path: str = "the parent run") -> Transition:
    """The transition from a parent run of ``parent_mode``; ``ConfigError`` when not allowed."""
    if parent_mode not in self.parents:
      raise errors.ConfigError(
          f"mode {self.name!r} starts from a run of mode {' or '.join(map(repr, self.parents))}; "
          f"{parent_path} was trained in mode {parent_mode!r}")
    return self.parents[parent_mode]


def _routed_parents(transition: Transition) -> Mapping[str, Transition]:
  return MappingProxyType({"poly": transition, "mhr": transition})


_MODES = (
    Mode("full", "no adapters: the whole backbone trains", has_adapters=False, routed=False,
         trains=frozenset({BACKBONE}), parents=MappingProxyType({"full": Transition.KEEP})),
    Mode("lora", "one LoRA per adapted layer, shared by all tasks", has_adapters=True,
         routed=False, trains=frozenset({ADAPTERS}),
         parents=MappingProxyType({"lora": Transition.KEEP})),
    Mode("poly", "K LoRA skills per layer, one routing distribution per task", has_adapters=True,
         routed=True, trains=frozenset({ROUTING, ADAPTERS}),
         parents=_routed_parents(Transition.NEW_TASK_ROWS), task_ids_matter=True,
         single_split=True),
    Mode("mhr", "K skills routed independently in S heads (blocks of features)",
         has_adapters=True, routed=True, trains=frozenset({ROUTING, ADAPTERS}),
         parents=_routed_parents(Transition.NEW_TASK_ROWS), task_ids_matter=True),
    Mode("mhr_z", "only the new tasks' routing trains; skills and backbone frozen",
         has_adapters=True, routed=True, trains=frozenset({ROUTING}),
         parents=_routed_parents(Transition.NEW_TASK_ROWS), needs_parent=True,
         task_ids_matter=True),
    Mode("mhr_mu", "the skills averaged into one LoRA per layer, which trains",
         has_adapters=True, routed=False, trains=frozenset({ADAPTERS}),
         parents=MappingProxyType({**_routed_parents(Transition.AVERAGE_SKILLS),
                                   "mhr_mu": Transition.KEEP}),
         needs_parent=True),
)
MODES: Mapping[str, Mode] = MappingProxyType({m.name: m for m in _MODES})
FULL = MODES["full"]
# The modes an ``AdapterConfig`` can name (all but ``full``).
ADAPTER_MODES = tuple(name for name, m in MODES.items() if m.has_adapters)


def modes_starting_from(parent_mode: Optional[str]) -> tuple[str, ...]:
  """The adapter modes a run may train in when it starts from a run of ``parent_mode``."""
  return tuple(name for name, m in MODES.items()
               if m.has_adapters and parent_mode in m.parents)


def get_mode(name: str) -> Mode:
  """The mode called ``name``; ``ConfigError`` listing the known ones otherwise."""
  if name not in MODES:
    raise errors.ConfigError(f"unknown adapter mode {name!r}; known: {list(MODES)}")
  return MODES[name]


@dataclasses.dataclass(frozen=True)
class RunKind:
  """The facts of one run kind (``run.kind``).

  Attributes:
    name: the kind's name in configs.
    summary: one line for people.
    trains: whether the run has a training loop (``eval`` has none).
    needs_own_checkpoint: whether the run evaluates its model directory's latest checkpoint.
    may_start_from_parent: whether ``TrainConfig.init_from`` names a run to start from (and
      modes with ``needs_parent`` must have one).
    modes: the modes it accepts; None for all.
    output_suffix: added to ``config.gin`` and ``results.json`` so that the run writes beside a
      finished run's files instead of replacing them.
  """

  name: str
  summary: str
  trains: bool
  needs_own_checkpoint: bool = False
  may_start_from_parent: bool = False
  modes: Optional[frozenset] = None
  output_suffix: str = ""

  def check_mode(self, mode: Mode) -> None:
    """``ConfigError`` unless this kind accepts ``mode``."""
    if self.modes is not None and mode.name not in self.modes:
      raise errors.ConfigError(
          f"kind {self.name!r} ({self.summary}) needs AdapterConfig.mode in "
          f"{sorted(self.modes)}; got {mode.name!r}")


_KINDS = (
    RunKind("pretrain", "multi-task training from the backbone", trains=True),
    RunKind("finetune", "adaptation to new tasks, from a pre-training run or the backbone",
            trains=True, may_start_from_parent=True),
    RunKind("eval", "evaluation of the model directory's latest checkpoint", trains=False,
            needs_own_checkpoint=True, may_start_from_parent=True, output_suffix="_eval"),
    RunKind("zeroshot", "a pre-trained MHR run averaged (MHR-mu), trained on the multi-task "
            "mixture, then held-out tasks evaluated with no task data", trains=True,
            may_start_from_parent=True, modes=frozenset({"mhr_mu"})),
)
RUN_KINDS: Mapping[str, RunKind] = MappingProxyType({k.name: k for k in _KINDS})


def get_kind(name: str) -> RunKind:
  """The run kind called ``name``; ``ConfigError`` listing the known ones otherwise."""
  if name not in RUN_KINDS:
    raise errors.ConfigError(f"kind must be one of {list(RUN_KINDS)}; got {name!r}")
  return RUN_KINDS[name]


def check_start(kind: RunKind, mode: Mode, has_parent: bool) -> None:
  """``ConfigError`` when ``mode`` must start from a pre-trained run and ``kind`` gives none."""
  if mode.needs_parent and kind.may_start_from_parent and not has_parent:
    raise errors.ConfigError(
        f"mode {mode.name!r} starts from a pre-trained run: set TrainConfig.init_from to its "
        "model directory")
