"""The model API: parameters, forward pass and KV-cache decoding of the FlexOlmo / OLMo-2 transformer.

``init`` returns a plain pytree of arrays; ``apply`` (traceable) and ``forward``
(jitted, checked) run :class:`flexmoe_jax.transformer.Transformer` on it.
Layers are stacked on a leading ``layers`` axis, expert tensors on an
``expert`` axis right after it (opting an expert out is a slice).

Parameter tree (shapes; logical axes in parentheses)::

    embed                   [V, d]          (vocab, embed)
    layers/attn/q_proj      [L, d, Hq*hd]   (layers, embed, q_width)
    layers/attn/k_proj      [L, d, Hk*hd]   (layers, embed, kv_width)
    layers/attn/v_proj      [L, d, Hk*hd]   (layers, embed, kv_width)
    layers/attn/o_proj      [L, Hq*hd, d]   (layers, q_width, embed)
    layers/attn/q_norm      [L, Hq*hd]      (layers, q_width)
    layers/attn/k_norm      [L, Hk*hd]      (layers, kv_width)
    layers/post_attn_norm   [L, d]          (layers, norm)
    layers/mlp/{gate,up}    [L, d, h]       dense OLMo-2 only
    layers/mlp/down         [L, h, d]
    layers/moe/router       [L, E, d]       (layers, router_expert, embed)
    layers/moe/bias         [L, E]          only with expert_bias
    layers/moe/{gate,up}    [L, E, d, h]    (layers, expert, embed, mlp)
    layers/moe/down         [L, E, h, d]    (layers, expert, mlp, embed)
    layers/post_ffn_norm    [L, d]
    final_norm              [d]
    lm_head                 [d, V]          (embed, vocab)

Design notes: docs/model.md.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from flexmoe_jax import selection
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.sharding import LOGICAL_RULES, tree_shardings
from flexmoe_jax.transformer import Transformer

Params = dict[str, Any]


# ----------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------

def _dummy_inputs(config: ModelConfig):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens)


def _init_boxed(config: ModelConfig, rng: jax.Array):
    return Transformer(config).init(rng, *_dummy_inputs(config))["params"]


def init(config: ModelConfig, rng: jax.Array | int = 0) -> Params:
    """Random parameters (normal(init_std) matrices, unit norms) as a plain pytree."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return nn.meta.unbox(jax.jit(_init_boxed, static_argnums=0)(config, rng))


@functools.lru_cache(maxsize=64)
def _abstract(config: ModelConfig):
    boxed = jax.eval_shape(functools.partial(_init_boxed, config), jax.random.PRNGKey(0))
    axes = jax.tree.map(lambda p: tuple(p.names), boxed, is_leaf=lambda p: isinstance(p, nn.Partitioned))
    return nn.meta.unbox(boxed), axes


def param_shapes(config: ModelConfig) -> Params:
    """A tree of jax.ShapeDtypeStruct: what ``init(config)`` returns, without computing it."""
    return _abstract(config)[0]


def logical_axes(config: ModelConfig) -> Params:
    """A tree of logical-axis-name tuples, one per parameter."""
    return _abstract(config)[1]


def param_shardings(config: ModelConfig, mesh: Mesh, rules=LOGICAL_RULES) -> Params:
    """NamedSharding of every parameter on ``mesh`` through the one rules table."""
    return tree_shardings(logical_axes(config), param_shapes(config), mesh, rules)


def init_sharded(config: ModelConfig, rng: jax.Array | int, mesh: Mesh) -> Params:
    """Initialize directly into the mesh layout (no host-sized copy of the model)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return _sharded_initializer(config, mesh)(rng)


@functools.lru_cache(maxsize=16)
def _sharded_initializer(config: ModelConfig, mesh: Mesh):
    return jax.jit(lambda r: nn.meta.unbox(_init_boxed(config, r)), out_shardings=param_shardings(config, mesh))


def check_params(config: ModelConfig, params: Params, what: str = "params") -> None:
    """Raise a clear error if the tree's paths or shapes disagree with ``config``."""
    want = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_leaves_with_path(param_shapes(config))}
    have = {jax.tree_util.keystr(k): tuple(np.shape(v))
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing {k} {want[k]}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k} has shape {have[k]}, config wants {want[k]}"
                 for k in want if k in have and have[k] != want[k]]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"{what} do not match the model config ({config.num_experts} experts, "
                        f"d_model {config.d_model}, {config.n_layers} layers): {shown}. "
                        "Load the params with the config they were saved with.")


# ----------------------------------------------------------------------------
# Opt-in / opt-out of experts
# ----------------------------------------------------------------------------

def upcycle_params(anchor_params: Params, config: ModelConfig, router: np.ndarray,
                   bias: np.ndarray | None = None) -> Params:
    """A dense model's params -> params of ``config`` (that model with ``config.num_experts`` experts),
    every expert a copy of the dense FFN, with router rows ``router`` ``[L, E, d]`` and, when given,
    bias ``bias`` ``[L, E]``; every other tensor is the dense model's. Checked against ``config``."""
    mlp = anchor_params["layers"]["mlp"]
    moe = {k: np.repeat(np.asarray(mlp[k])[:, None], config.num_experts, axis=1) for k in ("gate", "up", "down")}
    moe["router"] = np.asarray(router, dtype=moe["gate"].dtype)
    if bias is not None:
        moe["bias"] = np.asarray(bias, moe["router"].dtype)
    layers = {k: v for k, v in anchor_params["layers"].items() if k != "mlp"}
    params = {**anchor_params, "layers": {**layers, "moe": moe}}
    check_params(config, params, "upcycled params")
    return params


def select_experts(config: ModelConfig, params: Params, keep: Sequence[str | int],
                   top_k: int | None = None) -> tuple[ModelConfig, Params]:
    """Keep only the listed experts (names or slots); the rule is :mod:`flexmoe_jax.selection`'s."""
    return selection.select(config, params, include=keep, top_k=top_k)


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------

def apply(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None,
          segment_ids: jax.Array | None = None, mesh: Mesh | None = None, route_bias: jax.Array | None = None):
    """The traceable model: (logits [B, S, V] fp32, per-layer aux). Use inside your own jit.

    aux is ``{"router_z": [L, B, S], "gates": [L, B, S, E]}`` for an MoE and ``{}`` for
    a dense model. ``route_bias`` [B, S, E] is added to every layer's router logits (a routing
    mode's per-token decision, see :mod:`flexmoe_jax.routing`).
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    return Transformer(config, mesh).apply({"params": params}, tokens, positions, segment_ids, route_bias)


def apply_hidden(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array, mesh: Mesh | None = None):
    """:func:`apply` up to the output head: (final normalized hidden states [B, S, d] in the compute
    dtype, aux). ``hidden @ params["lm_head"]`` (fp32 accumulation) are :func:`apply`'s logits."""
    return Transformer(config, mesh, head=False).apply({"params": params}, tokens, positions, segment_ids)


@functools.partial(jax.jit, static_argnames=("config",))
def ffn_inputs(config: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """The residual stream entering each layer's FFN, [L, B, S, d]: exactly what a router row is dotted with."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    _, state = Transformer(config).apply({"params": params}, tokens, positions, segment_ids,
                                         mutable=["intermediates"])
    return state["intermediates"]["layers"]["ffn_input"][0]


@functools.partial(jax.jit, static_argnames=("config", "keep", "mesh"))
def _forward_jit(config, params, tokens, positions, segment_ids, keep, mesh):
    params = selection.take(params, keep)
    logits, aux = apply(config, params, tokens, positions, segment_ids, mesh)
    return logits, summarize_aux(logits, aux)


def summarize_aux(logits: jax.Array, aux: dict) -> dict:
    """Per-token auxiliary losses: router z-loss (mean over layers) and logit z-loss."""
    out = {"logit_z": jnp.square(jax.nn.logsumexp(logits, axis=-1))}
    if "router_z" in aux:
        out["router_z"] = jnp.mean(aux["router_z"], axis=0)
        out["gates"] = aux["gates"]
    return out


def check_tokens(config: ModelConfig, tokens: Any) -> None:
    shape = np.shape(tokens)
    if len(shape) != 2:
        raise UserError(f"tokens must be int32 [batch, seq], got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise UserError(f"tokens must be integer ids, got dtype {jnp.result_type(tokens)}")
    if shape[1] > config.max_seq_len:
        raise UserError(f"sequence length {shape[1]} exceeds the model's position limit "
                        f"max_seq_len={config.max_seq_len}; truncate or split the input")
    if not isinstance(tokens, jax.core.Tracer) and shape[1] > 0:
        arr = np.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= config.vocab_size:
            raise UserError(f"token ids must be in [0, {config.vocab_size}) for this model's vocab, "
                            f"got ids in [{lo}, {hi}]; was the text encoded with another tokenizer?")


def forward(config: ModelConfig, params: Params, tokens: Any, *,
            active_experts: Sequence[str | int] | None = None, top_k: int | None = None,
            positions: Any = None, segment_ids: Any = None, return_aux: bool = False,
            mesh: Mesh | None = None):
    """Logits float32 [batch, seq, vocab] of ``tokens`` int32 [batch, seq].

    ``active_experts`` (names or slot indices) opts every other expert out: the
    expert axis is sliced before routing, so excluded experts can never win
    and their weights are never read. ``top_k`` overrides the config's.
    With ``return_aux=True`` also returns per-token ``router_z``, ``logit_z`` and
    the per-layer ``gates`` [L, B, S, E_active] (for attribution).
    """
    check_tokens(config, tokens)
    check_params(config, params)
    run_config, keep = selection.plan(config, include=active_experts, top_k=top_k)
    tokens = jnp.asarray(tokens, jnp.int32)
    logits, aux = _forward_jit(run_config, params, tokens,
                               None if positions is None else jnp.asarray(positions, jnp.int32),
                               None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
                               keep, mesh)
    return (logits, aux) if return_aux else logits


# ----------------------------------------------------------------------------
# KV-cache decoding
# ----------------------------------------------------------------------------

Cache = dict[str, Any]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
    """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated).

    A plain pytree beside the params: ``index`` [] int32 (next slot to write, same for
    every row), ``segment_ids`` [B, M] int32 (segment of each written slot, 0 = left
    padding), ``layers/attn/{key,value}`` [L, B, M, Hk, hd] in ``config.dtype``, and with
    ``document_*`` routing ``layers/moe/route_sum`` [L, B, E] fp32. M = ``max_len`` is fixed,
    so every call has static shapes (docs/model.md, KV-cache decoding).
    """
    if batch <= 0 or max_len <= 0:
        raise UserError(f"a cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    kv = jnp.zeros((config.n_layers, batch, max_len, config.kv_heads, config.head_size), jnp.dtype(config.dtype))
    cache = {"index": jnp.zeros((), jnp.int32), "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
             "layers": {"attn": {"key": kv, "value": kv}}}
    if config.is_moe and config.routing.startswith("document_"):  # running sums of the router logits
        cache["layers"]["moe"] = {"route_sum": jnp.zeros((config.n_layers, batch, config.num_experts), jnp.float32)}
    return cache


def decode_apply(config: ModelConfig, params: Params, cache: Cache, tokens: jax.Array,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 mesh: Mesh | None = None, route_bias: jax.Array | None = None):
    """The traceable cached model: (logits [B, S, V] fp32, aux, new cache). Use inside your own jit.

    ``tokens`` [B, S] are written at slots ``[cache["index"], cache["index"] + S)``:
    S = the (left-padded) prompt length for the prefill, 1 for each decode step.
    ``positions`` default to the slot numbers (right for unpadded rows); pass
    ``slot - left_pad`` for padded rows. Writing past the cache's length is not
    checked here (it cannot be inside jit): callers size the cache.
    """
    if positions is None:
        positions = jnp.broadcast_to(cache["index"] + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    (logits, aux), state = Transformer(config, mesh, decode=True).apply(
        {"params": params, "cache": cache}, tokens, positions, segment_ids, route_bias, mutable=["cache"])
    return logits, aux, state["cache"]


@functools.partial(jax.jit, static_argnames=("config", "keep"))
def _decode_jit(config, params, cache, tokens, positions, segment_ids, keep):
    params = selection.take(params, keep)
    return decode_apply(config, params, cache, tokens, positions, segment_ids)


def decode_step(config: ModelConfig, params: Params, cache: Cache, tokens: Any, *,
                positions: Any = None, segment_ids: Any = None,
                active_experts: Sequence[str | int] | None = None, top_k: int | None = None,
                return_aux: bool = False):
    """Run ``tokens`` [B, S] against ``cache``: ``(logits [B, S, V], new_cache)`` (jit-compiled).

    The prefill is one call with the whole prompt on a fresh :func:`init_cache`;
    each later call feeds the S (usually 1) next tokens. The logits equal
    :func:`forward`'s on the whole sequence so far. ``active_experts``/``top_k``
    as in :func:`forward` (use the same ones on every call of a sequence); with
    ``return_aux=True`` returns ``(logits, aux, cache)`` with aux ``gates`` [L, B, S, E_active].
    """
    check_tokens(config, tokens)
    check_params(config, params)
    b, s = np.shape(tokens)
    m = cache["segment_ids"].shape
    if m[0] != b:
        raise UserError(f"tokens have batch {b} but the cache was made for batch {m[0]}")
    if not isinstance(cache["index"], jax.core.Tracer) and int(cache["index"]) + s > m[1]:
        raise UserError(f"the cache holds {m[1]} tokens and {int(cache['index'])} are used; "
                        f"{s} more do not fit (make the cache with a larger max_len)")
    run_config, keep = selection.plan(config, include=active_experts, top_k=top_k)
    logits, aux, cache = _decode_jit(run_config, params, cache, jnp.asarray(tokens, jnp.int32),
                                     None if positions is None else jnp.asarray(positions, jnp.int32),
                                     None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32), keep)
    return (logits, aux, cache) if return_aux else (logits, cache)
