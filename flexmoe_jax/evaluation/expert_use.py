"""Which experts a merged model's router picks for each domain's tokens (routing statistics)."""


import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model, routing as routing_lib
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.data import eval_sample as sample_lib
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation.scorers import _device_batch
from flexmoe_jax.evaluation.tasks import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, resolve_tasks, short_name


@functools.partial(jax.jit, static_argnames=("config",))
def _selected(config: ModelConfig, params, inputs, positions, segment_ids, route_bias=None):
    """[L, B, S, E] 1 where the expert has a nonzero weight (any of the top-k), else 0."""
    _, aux = model.apply(config, params, inputs, positions, segment_ids, route_bias=route_bias)
    return (aux["gates"] > 0).astype(jnp.float32)


def routing(config: ModelConfig, params: model.Params, data_dir, tasks: Sequence[str] | None = None,
            split: str = "test", seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = DEFAULT_BATCH_SIZE,
            max_tokens: int | None = None, sample_seed: int = 0, routing_stats: Mapping | None = None,
            mode: str | None = None, groups: Mapping[str, Sequence[str]] | None = None,
            score: Mapping | None = None) -> dict:
    """Where a merged model sends each domain's tokens: for every domain, the share of the real
    tokens of its evaluation sample (the documents :func:`perplexity` scores with the same
    ``max_tokens`` / ``sample_seed``; all layers) for which each expert is among the top-k. ``own``
    is the share routed to the expert named like the domain (None if there is none): with experts
    trained apart, this is what decides how much of each owner's gain the merged model keeps.
    The shares of one domain sum to the top-k (top-k routing; with ``routing_stats``, domain routing,
    between 1 and 2: a token of domain public uses the public expert alone). Returns ``{domain: {"picked": {expert:
    share},
    "own": share | None, "tokens": tokens counted}}``. ``mode``: the routing mode
    (:func:`flexmoe_jax.routing.resolve`). ``groups`` ({domain: expert names}) adds ``"group"``: the
    share of the domain's tokens (and layers) for which any expert of its group is active.
    """
    if not config.is_moe:
        raise UserError("routing statistics need an MoE model; this one is dense (num_experts=0)")
    config, router = routing_lib.resolve(config, mode, routing_stats, score=score)
    out = {}
    for task in resolve_tasks(data_dir, tasks):
        dom = short_name(task)
        s = sample_lib.draw(data_dir, task, split, min(seq_len, config.max_seq_len), max_tokens, sample_seed)
        picked, count, in_group = np.zeros(config.num_experts), 0.0, 0.0
        group = [i for i, n in enumerate(config.names) if n in (groups or {}).get(dom, ())]
        for _, batch in s.batches(batch_size):
            inputs, _, positions, segs = _device_batch(batch)
            bias = None if router is None else router.bias(inputs, positions, segs)
            sel = np.asarray(_selected(config, params, inputs, positions, segs, bias))  # [L, B, S, E]
            real = np.asarray(batch["decoder_loss_weights"]) > 0
            picked += sel[:, real].sum(axis=(0, 1))
            count += sel.shape[0] * real.sum()
            if group:
                in_group += (sel[:, real][..., group].max(axis=-1)).sum()
        shares = {n: float(v / max(count, 1.0)) for n, v in zip(config.names, picked)}
        out[dom] = {"picked": shares, "own": shares.get(dom), "tokens": int(count // config.n_layers)}
        if group:
            out[dom]["group"] = float(in_group / max(count, 1.0))
    return out
