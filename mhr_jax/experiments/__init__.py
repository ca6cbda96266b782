"""Multi-stage experiments built from ``trainer.run``, their stages described as data.

``pipeline`` (stages, their parents, their run configurations), ``synthetic`` (the embedded
benchmark, gin name ``synthetic_benchmark``) and ``study`` (that benchmark over seeds with paired
statistics, gin name ``synthetic_study``). Importing the package registers the gin configurables.
"""

from mhr_jax.experiments import synthetic  # noqa: F401  (registers synthetic_benchmark)
from mhr_jax.experiments import study  # noqa: F401  (registers synthetic_study)
from mhr_jax.experiments.synthetic import METHODS, synthetic_benchmark  # noqa: F401
