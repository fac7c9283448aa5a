"""Taking experts out of (and, later, into) a merged FlexOlmo model.

Expert tensors are stacked on the expert axis (axis 1 of every ``layers/moe``
leaf, after the layer axis), so removing an expert is a slice of that axis and
of the router rows; nothing else in the model changes. Routing then softmaxes
over the remaining experts, exactly the reference's opt-out, with no retraining.
"""

from __future__ import annotations

from typing import Sequence

from flexmoe_jax import model
from flexmoe_jax.config import ModelConfig


def exclude(config: ModelConfig, params: model.Params, names: Sequence[str | int],
            top_k: int | None = None) -> tuple[ModelConfig, model.Params]:
    """Physically remove the named experts (names or slot indices).

    Returns a new (config, params) with E - len(names) experts; top-k is capped at
    the number left unless ``top_k`` is given. Unknown names, duplicates and
    removing every expert are errors.
    """
    drop = model.resolve_experts(config, names)
    keep = [i for i in range(config.num_experts) if i not in drop]
    if not keep:
        raise ValueError(f"cannot exclude every expert {list(config.names)}; keep at least one")
    return model.select_experts(config, params, keep, top_k=top_k)


def include(config: ModelConfig, params: model.Params, names: Sequence[str | int],
            top_k: int | None = None) -> tuple[ModelConfig, model.Params]:
    """Keep only the named experts (the opt-in form of :func:`exclude`)."""
    return model.select_experts(config, params, names, top_k=top_k)
