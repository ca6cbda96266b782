"""A run's adapter configuration when it starts from a checkpoint (``TrainConfig.init_from``).

The authors' fine-tuning (microsoft/mttl, tag ``mhr-camera-ready``,
``projects/mhr/pl_finetune.py``) copies a fixed list of arguments (``ARGS_TO_OVERWRITE``) from
the pre-training checkpoint unless the run's config files or ``-k`` flags set them
(``Config.was_overridden``). Here the parent's model is rebuilt with the parent's saved
``AdapterConfig`` (``run_state.build_model``), except for the fields below that the run sets
itself:

- ``USER_WINS``: the run's value applies to the rebuilt model (the LoRA scale, the routing noise).
- ``FIXED``: the value the restored parameters were made with (shapes, adapted layers, the draw
  of ``lora_a``); a run value that differs cannot apply and is an error naming both.

Which fields a run "sets" is given by the caller: the fields gin binds (``trainer.run``), or, for
a config built in Python, those that differ from the ``AdapterConfig`` defaults (``fields_set``).
docs/paper_settings.md maps each of the authors' arguments to its field here.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from mhr_jax import adapters, errors, modes

USER_WINS = ("lora_alpha", "relaxed_bernoulli", "temperature")
FIXED = ("n_skills", "n_splits", "lora_rank", "layers", "init")
# Kept from the parent whatever the run says: filled in by the code, never typed by hand
# (n_tasks, n_frozen_tasks) or the dtype the restored parameters are stored in.
FROM_PARENT = ("n_tasks", "n_frozen_tasks", "param_dtype")


def parent_adapter_config(parent: dict) -> Optional[adapters.AdapterConfig]:
  """The adapter configuration a parent run saved (None for ``full``).

  Checkpoints written before the routing anneal was removed carry ``anneal_steps``; its variables
  were never checkpointed (nothing set them), so the field is dropped.
  """
  saved = parent.get("adapter_config")
  if not saved:
    return None
  return adapters.AdapterConfig(**{k: v for k, v in saved.items() if k != "anneal_steps"})


def fields_set(adapter_cfg: Optional[adapters.AdapterConfig]) -> frozenset[str]:
  """The fields of a config built in Python that count as set: those that differ from the
  ``AdapterConfig`` defaults (a dataclass does not record which arguments it was given)."""
  if adapter_cfg is None:
    return frozenset()
  defaults = adapters.AdapterConfig()
  return frozenset(f.name for f in dataclasses.fields(adapter_cfg)
                   if getattr(adapter_cfg, f.name) != getattr(defaults, f.name))


def rebuilt_config(adapter_cfg: Optional[adapters.AdapterConfig], parent: dict,
                   set_fields: Iterable[str]) -> Optional[adapters.AdapterConfig]:
  """The configuration the parent's model is rebuilt with: the parent's, with the run's own
  ``USER_WINS`` fields where it sets them. Raises ``errors.ConfigError`` naming both values for
  a ``FIXED`` field the run sets to another value than the checkpoint's."""
  pcfg = parent_adapter_config(parent)
  if adapter_cfg is None or pcfg is None:
    return pcfg
  set_fields = frozenset(set_fields)
  for name in FIXED:
    ours, theirs = getattr(adapter_cfg, name), getattr(pcfg, name)
    if name in set_fields and ours != theirs:
      raise errors.ConfigError(
          f"AdapterConfig.{name}={ours!r}, but the checkpoint this run starts from "
          f"({parent['path']}) was trained with {name}={theirs!r}; a run that starts from a "
          f"checkpoint takes its adapter structure from it: drop the setting or set it to "
          f"{theirs!r}")
  return dataclasses.replace(
      pcfg, **{n: getattr(adapter_cfg, n) for n in USER_WINS if n in set_fields})


def built_config(adapter_cfg: adapters.AdapterConfig, rebuilt: adapters.AdapterConfig,
                 transition: modes.Transition, n_tasks: int) -> adapters.AdapterConfig:
  """What the run's model holds after ``transition`` (``adapters.start_from``) from a parent
  rebuilt with ``rebuilt``, as a config that builds the same structure again: the run's mode,
  ``n_tasks`` routing rows, and with new task rows the parent's rows frozen ahead of them. This is
  what the run saves, so that resuming it, exporting it or starting from it rebuilds its model."""
  n_new = n_tasks - rebuilt.n_tasks
  frozen = rebuilt.n_frozen_tasks
  if transition is modes.Transition.NEW_TASK_ROWS and n_new > 0:
    frozen = rebuilt.n_tasks  # add_tasks(keep_existing=True) freezes every row the parent had
  elif transition is modes.Transition.AVERAGE_SKILLS:
    frozen = 0  # no routing remains
  return dataclasses.replace(rebuilt, mode=adapter_cfg.mode, n_tasks=n_tasks,
                             n_frozen_tasks=frozen)
