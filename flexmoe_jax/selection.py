"""Which experts run and how many per token: the one place for opt-in/opt-out and the top-k rule.

Every caller (the forward pass, decoding, generation, merged-model loading, evaluation, privacy)
asks this module; the vocabulary is ``include`` (keep only these) and ``exclude`` (drop these),
given as expert names (``str``) or slot indices (``int``, the Python API only).

The rule:
- names and slots resolve to sorted, unique slots; an unknown name, a repeat, or nothing left is an error;
- ``include`` and ``exclude`` cannot both be given; a single name counts as a list of one;
- the kept experts are sliced out on the expert axis, so routing softmaxes over them only, exactly as
  if the others had never been merged;
- an explicit ``top_k`` must be between 1 and the number kept; otherwise the config's own top-k is
  capped at the number kept.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError

Experts = Sequence[str | int] | str | int | None


def _as_list(experts: Experts) -> list | None:
    if experts is None:
        return None
    if isinstance(experts, (str, int, np.integer)):
        return [experts]  # exclude(config, params, "math") means the expert "math", not its letters
    return list(experts)


def resolve(config: ModelConfig, experts: Experts) -> tuple[int, ...]:
    """Expert names or slot indices -> sorted, unique slot indices (clear errors otherwise)."""
    if not config.is_moe:
        raise UserError("this is a dense model (num_experts=0): there are no experts to select")
    names = config.names
    out = []
    for item in _as_list(experts) or []:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= item < len(names):
                raise UserError(f"expert index {item} is out of range: this model has experts "
                                f"0..{len(names) - 1} {list(names)}")
            out.append(int(item))
        elif isinstance(item, str):
            if item not in names:
                raise UserError(f"unknown expert {item!r}; this model's experts are {list(names)}")
            out.append(names.index(item))
        else:
            raise TypeError(f"experts are named by str or int, got {item!r}")
    if len(set(out)) != len(out):
        raise UserError(f"expert listed twice in {_as_list(experts)}")
    if not out:
        raise UserError(f"at least one expert must stay active; this model's experts are {list(names)}")
    return tuple(sorted(out))


def check_one_of(include: Experts, exclude: Experts) -> None:
    """An expert selection names the experts kept or the ones left out, never both."""
    if include is not None and exclude is not None:
        raise UserError("give include or exclude, not both")


def kept(config: ModelConfig, include: Experts = None, exclude: Experts = None) -> tuple[int, ...] | None:
    """The slots that stay active (None: every one, nothing was selected)."""
    check_one_of(include, exclude)
    if include is not None:
        return resolve(config, include)
    if exclude is None:
        return None
    if not config.is_moe:
        raise UserError("this is a dense model (num_experts=0): there are no experts to exclude")
    drop = resolve(config, exclude) if _as_list(exclude) else ()
    keep = tuple(i for i in range(config.num_experts) if i not in drop)
    if not keep:
        raise UserError(f"cannot exclude every expert {list(config.names)}; keep at least one")
    return keep


def selected_config(config: ModelConfig, keep: tuple[int, ...] | None, top_k: int | None = None) -> ModelConfig:
    """The config of the model that runs: the kept experts (None: all) and the top-k rule above."""
    if keep is None:  # every expert: only top-k can change
        if top_k is None:
            return config
        if not config.is_moe:
            raise UserError(f"top_k={top_k} given for a dense model (num_experts=0), which has no router")
        if not 1 <= top_k <= config.num_experts:
            raise UserError(f"top_k={top_k} must be between 1 and the {config.num_experts} experts")
        return config.replace(top_k=top_k)
    if top_k is not None and not 1 <= top_k <= len(keep):
        why = (f": top_k={top_k} is larger than the {len(keep)} active experts; lower top_k or activate more "
               "experts" if top_k > len(keep) else "")
        raise UserError(f"top_k={top_k} must be between 1 and the {len(keep)} active experts "
                        f"{[config.names[i] for i in keep]}{why}")
    k = top_k if top_k is not None else min(config.top_k, len(keep))
    return config.replace(num_experts=len(keep), top_k=k, expert_names=tuple(config.names[i] for i in keep))


def take(params: Any, keep: tuple[int, ...] | None) -> Any:
    """``params`` with only the kept experts' slices (works inside jit; None: unchanged)."""
    if keep is None:
        return params
    import jax.numpy as jnp

    idx = np.asarray(keep)
    layers = dict(params["layers"])
    layers["moe"] = {name: jnp.take(w, idx, axis=1) for name, w in layers["moe"].items()}
    return {**params, "layers": layers}


def plan(config: ModelConfig, include: Experts = None, exclude: Experts = None,
         top_k: int | None = None) -> tuple[ModelConfig, tuple[int, ...] | None]:
    """(config that runs, kept slots or None) for a call's include/exclude/top_k."""
    keep = kept(config, include, exclude)
    return selected_config(config, keep, top_k), keep


def select(config: ModelConfig, params: Any, include: Experts = None, exclude: Experts = None,
           top_k: int | None = None) -> tuple[ModelConfig, Any]:
    """In-memory opt-in/opt-out: (config, params) of the model with only the kept experts."""
    run_config, keep = plan(config, include, exclude, top_k)
    if keep is not None and len(keep) == config.num_experts:
        keep = None  # nothing to slice
    return run_config, take(params, keep)


def exclude(config: ModelConfig, params: Any, names: Experts,
            top_k: int | None = None) -> tuple[ModelConfig, Any]:
    """(config, params) without the named experts (names or slot indices): the opt-out on params in memory."""
    return select(config, params, exclude=names, top_k=top_k)


def include(config: ModelConfig, params: Any, names: Experts,
            top_k: int | None = None) -> tuple[ModelConfig, Any]:
    """(config, params) with only the named experts: the opt-in form of :func:`exclude`."""
    return select(config, params, include=names, top_k=top_k)
