"""The training loop: :func:`run` trains (or resumes) one phase into a work directory.

- :mod:`~flexmoe_jax.trainer.run_config`: :class:`RunConfig`, :class:`TrainingError`.
- :mod:`~flexmoe_jax.trainer.start`: the parameters a phase starts from.
- :mod:`~flexmoe_jax.trainer.state_store`: the resumable training state on disk.
- :mod:`~flexmoe_jax.trainer.logs`: metrics.jsonl, TensorBoard, FLOPs metadata.
- :mod:`~flexmoe_jax.trainer.loop`: :func:`run`.

The one jitted step and the phase's split/shardings are :mod:`flexmoe_jax.train`.
Resume, failure and multi-process semantics: docs/training.md.
"""

from flexmoe_jax.trainer.loop import run
from flexmoe_jax.trainer.run_config import RunConfig, TrainingError

__all__ = ["RunConfig", "TrainingError", "run"]
