"""Loading what is evaluated: a checkpoint, merged model or run directory -> (config, params),
with its default routing and the name results are filed under."""


import os
from pathlib import Path
from typing import Sequence

from flexmoe_jax import loading, model, storage
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError


def _model_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory's ``model/`` (else ``path``, for the loader's error)."""
    return loading.run_checkpoint(path, "model") or storage.resolve(path)


def load_model(path: str | os.PathLike, *, include=None, exclude=None, top_k=None
               ) -> tuple[ModelConfig, model.Params]:
    """(config, params) of a plain or merged checkpoint or a run directory, with opt-in/opt-out."""
    from flexmoe_jax import checkpoint, expert

    d = _model_dir(path)
    if d.is_dir() and checkpoint.kind(d) == expert.DELIVERABLE_KIND:
        raise UserError(f"{path} is an expert deliverable: it holds only the owner's trained slot. Evaluate "
                        "its run directory (or WORKDIR/model), or the merged model")
    return loading.load(d, include=include, exclude=exclude, top_k=top_k)


def default_routing(path: str | os.PathLike, config: ModelConfig, routing: str | None = None
                    ) -> tuple[str | None, dict | None]:
    """``(routing mode, routing stats)`` a checkpoint is run with when ``routing`` is not given: domain
    routing when it carries routing stats for every active expert (merged models made with them; the
    ablations pick it, README "Routing ablations"), else the config's own routing. Given ``domain``,
    the stats it carries (None if it has none)."""
    if routing not in (None, "domain") or not config.is_moe:
        return routing, None
    stats = checkpoint_routing_stats(path, config.names)
    if routing is None and (stats is None or set(config.names) - set(stats) or "public" not in config.names):
        return None, None
    return "domain", stats


def checkpoint_routing_stats(path: str | os.PathLike, names: Sequence[str]) -> dict | None:
    """The routing stats a merged checkpoint (or run directory) carries for ``names``; None if none."""

    return loading.read_routing_stats(_model_dir(path), names) or None


def default_name(path: str | os.PathLike, include=None, exclude=None) -> str:
    """A model's results name from its path (``.../humor/model`` -> ``humor``), plus its opt-in/out."""
    p = storage.resolve(path)
    name = p.parent.name if p.name in ("model", "expert") else p.name
    if exclude:
        name += "_minus_" + "_".join(str(x) for x in exclude)
    if include:
        name += "_only_" + "_".join(str(x) for x in include)
    return name
