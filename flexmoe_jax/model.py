"""The FlexOlmo / OLMo-2 transformer as a pure function of (config, params, tokens).

Flax linen modules define the computation; ``init`` returns a plain pytree of
arrays and ``forward``/``apply`` run it. Layers are stacked on a leading
``layers`` axis and run with ``nn.scan`` so compile time does not grow with
depth; expert tensors are stacked on an ``expert`` axis right after it, so
opting an expert out is a slice and merging experts is a concatenation.

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

Block semantics are the reference's "reordered norm": ``h = x + norm(attn(x))``,
``out = h + norm(ffn(h))``, QK-norm over the full q/k width before the head
split, RoPE, untied output head, router on the raw residual stream.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from flexmoe_jax import moe as moe_lib, selection
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.sharding import LOGICAL_RULES, constrain, tree_shardings

Params = dict[str, Any]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32, as the reference does, then cast back."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, 1, hd] for HF's "rotate_half" RoPE; computed once, shared by all layers."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding of x [B, S, N, hd] with precomputed (cos, sin)."""
    cos, sin = tables
    hd = x.shape[-1]
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., hd // 2:], x32[..., : hd // 2]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str | None) -> jax.Array:
    """Softmax attention, q [B, S, Hq, hd], k/v [B, M, Hk, hd], GQA by grouping query heads.

    The XLA form is laid out head-major ([B, Hk, G, S, hd]) so each (batch, head)
    matmul reads contiguous rows, and normalizes after the weighted sum
    (exp(s - max) @ v / sum): on XLA:CPU both together make this ~1.75x faster
    than the plain einsum + softmax form, and faster than
    ``jax.nn.dot_product_attention``'s XLA path. A row with every key masked
    gets uniform weights, as a softmax over equal (minimal) scores would.
    ``impl="cudnn"`` uses the fused GPU kernel through that function instead.
    """
    if impl is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    b, s, hq, hd = q.shape
    hk = k.shape[2]
    qt = q.reshape(b, s, hk, hq // hk, hd).transpose(0, 2, 3, 1, 4)  # [B, Hk, G, S, hd]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)        # [B, Hk, M, hd]
    scores = jnp.einsum("bkgqd,bksd->bkgqs", qt, kt, preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    unnorm = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("bkgqs,bksd->bkgqd", unnorm.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    out = out / jnp.sum(unnorm, axis=-1, keepdims=True)
    return out.astype(v.dtype).transpose(0, 3, 1, 2, 4).reshape(b, s, hq, hd)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Attention(nn.Module):
    """GQA self-attention with QK-norm and RoPE.

    With ``decode=True`` the layer keeps its keys and values in the ``cache``
    collection (``key``/``value`` [B, M, Hk, hd], M fixed when the cache is made
    by :func:`init_cache`): the S new keys/values are written at slots
    ``[cache_index, cache_index + S)`` and the queries attend over all M slots
    under ``mask`` [B, 1, S, M] (built by :class:`Transformer`). One code path
    serves a whole-prompt prefill (S = prompt length) and a one-token step.
    """
    config: ModelConfig
    mesh: Mesh | None = None
    decode: bool = False

    @nn.compact
    def __call__(self, x, rope_cs, mask, cache_index=None):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.init_std)
        qw, kw = c.n_heads * c.head_size, c.kv_heads * c.head_size
        q_proj = _param(self, "q_proj", init, (c.d_model, qw), ("embed", "q_width"), pdt)
        k_proj = _param(self, "k_proj", init, (c.d_model, kw), ("embed", "kv_width"), pdt)
        v_proj = _param(self, "v_proj", init, (c.d_model, kw), ("embed", "kv_width"), pdt)
        o_proj = _param(self, "o_proj", init, (qw, c.d_model), ("q_width", "embed"), pdt)
        q_norm = _param(self, "q_norm", nn.initializers.ones, (qw,), ("q_width",), pdt)
        k_norm = _param(self, "k_norm", nn.initializers.ones, (kw,), ("kv_width",), pdt)

        b, s, _ = x.shape
        q = rms_norm(x @ q_proj.astype(dt), q_norm, c.rms_eps).reshape(b, s, c.n_heads, c.head_size)
        k = rms_norm(x @ k_proj.astype(dt), k_norm, c.rms_eps).reshape(b, s, c.kv_heads, c.head_size)
        v = (x @ v_proj.astype(dt)).reshape(b, s, c.kv_heads, c.head_size)
        q = constrain(rope(q, rope_cs), ("batch", "length", "act_heads", "act_head_dim"), self.mesh)
        k = constrain(rope(k, rope_cs), ("batch", "length", "act_kv_heads", "act_head_dim"), self.mesh)
        v = constrain(v, ("batch", "length", "act_kv_heads", "act_head_dim"), self.mesh)
        if self.decode:
            if not self.has_variable("cache", "key"):
                raise UserError("decoding needs a cache: build one with model.init_cache(config, batch, max_len)")
            ck, cv = self.variable("cache", "key", None), self.variable("cache", "value", None)
            at = (0, cache_index, 0, 0)
            ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), at)
            cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), at)
            k, v = ck.value.astype(dt), cv.value.astype(dt)
        out = attention(q, k, v, mask, c.attention_impl)
        out = out.reshape(b, s, qw) @ o_proj.astype(dt)
        return constrain(out, ("batch", "length", "act_embed"), self.mesh)


class DenseFFN(nn.Module):
    """The OLMo-2 SwiGLU FFN: down(silu(gate(x)) * up(x))."""
    config: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, route_bias=None, positions=None, segment_ids=None):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.init_std)
        gate = _param(self, "gate", init, (c.d_model, c.mlp_hidden), ("embed", "mlp"), pdt)
        up = _param(self, "up", init, (c.d_model, c.mlp_hidden), ("embed", "mlp"), pdt)
        down = _param(self, "down", init, (c.mlp_hidden, c.d_model), ("mlp", "embed"), pdt)
        h = jax.nn.silu(x @ gate.astype(dt)) * (x @ up.astype(dt))
        h = constrain(h, ("batch", "length", "act_mlp"), self.mesh)
        return h @ down.astype(dt), {}


class MoEFFN(nn.Module):
    """FlexOlmo's mixture of SwiGLU experts with a linear router.

    ``config.routing`` ``document_*``: each token is routed on its layer's router logits averaged
    over its segment so far (``positions``/``segment_ids``); decoding keeps the running sum in the
    cache (``route_sum``, one document per row, as :mod:`flexmoe_jax.generate` feeds it).
    """
    config: ModelConfig
    mesh: Mesh | None = None
    decode: bool = False

    @nn.compact
    def __call__(self, x, route_bias=None, positions=None, segment_ids=None):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.init_std)
        e, d, h = c.num_experts, c.d_model, c.mlp_hidden
        router = jnp.concatenate(self._slots("router", init, (e, d), ("router_expert", "embed"), pdt))
        bias = (jnp.concatenate(self._slots("bias", nn.initializers.zeros, (e,), ("router_expert",), pdt))
                if c.expert_bias else None)
        experts = tuple(moe_lib.Experts(wg.astype(dt), wu.astype(dt), wd.astype(dt)) for wg, wu, wd in zip(
            self._slots("gate", init, (e, d, h), ("expert", "embed", "mlp"), pdt),
            self._slots("up", init, (e, d, h), ("expert", "embed", "mlp"), pdt),
            self._slots("down", init, (e, h, d), ("expert", "mlp", "embed"), pdt)))
        b, s, _ = x.shape
        flat = x.reshape(b * s, d)
        logits = None
        if c.router_score != "dot" or c.routing.startswith("document_"):
            logits = moe_lib.router_logits(flat, router, bias, c.router_score, c.router_temperature)
        if c.routing.startswith("document_"):
            logits = self._document_logits(logits.reshape(b, s, e), positions, segment_ids).reshape(b * s, e)
        always = c.names.index("public") if c.routing.endswith("public_plus") else None
        routing = moe_lib.route(flat, router, bias, c.top_k, c.norm_topk_prob,
                                None if route_bias is None else route_bias.reshape(b * s, e), always, logits)
        if self.mesh is not None and self.mesh.size > 1:  # expert-parallel: each device runs its own experts
            y = moe_lib.dispatch_sharded(flat, routing, experts, self.mesh, c.moe_impl, c.moe_block_size)
        else:
            y = moe_lib.dispatch(flat, routing, experts, c.moe_impl, c.moe_block_size)
        aux = {
            "router_z": moe_lib.router_z_loss(routing).reshape(b, s),
            "gates": moe_lib.gate_matrix(routing, e).reshape(b, s, e),
            # What a routing loss trains: the rows and bias on the residual as it is (no gradient
            # into the residual, so the loss moves only the router). Unused outputs are pruned by XLA.
            "router_logits": moe_lib.router_logits(jax.lax.stop_gradient(flat), router, bias, c.router_score,
                                                   c.router_temperature).reshape(b, s, e),
        }
        return y.reshape(b, s, d), aux

    def _document_logits(self, logits, positions, segment_ids):
        """[B, S, E] -> each token's logits averaged over its segment up to and including it."""
        if positions is None or segment_ids is None:
            raise UserError(f"routing={self.config.routing!r} needs positions and segment_ids")
        summed = moe_lib.segment_cumsum(logits, positions, segment_ids)
        if self.decode:  # add what earlier calls saw (the row is one segment)
            run = self.variable("cache", "route_sum", jnp.zeros, logits.shape[:1] + logits.shape[2:], jnp.float32)
            summed = summed + run.value[:, None]
            run.value = summed[:, -1]
        return summed / (jnp.maximum(positions, 0) + 1).astype(jnp.float32)[..., None]

    def _slots(self, name, init, shape, axes, dtype) -> list[jax.Array]:
        """An expert-stacked parameter: whole, or as ``name#slot`` pieces in slot order.

        The training step passes expert training's frozen public slot and the
        trained slot as separate pieces (``optim.combine(..., concat_slots=False)``)
        and they are joined only here, inside the scanned layer: the frozen piece
        is then never differentiated, so the backward pass skips its weight
        gradients instead of computing and discarding them.
        """
        pieces = sorted((int(k.rsplit("#", 1)[1]), k) for k in self.variables.get("params", {})
                        if k.startswith(name + "#"))
        if not pieces:
            return [_param(self, name, init, shape, axes, dtype)]
        return [self.get_variable("params", k) for _, k in pieces]


class Block(nn.Module):
    config: ModelConfig
    mesh: Mesh | None = None
    decode: bool = False

    @nn.compact
    def __call__(self, x, rope_cs, mask, route_bias=None, positions=None, segment_ids=None, cache_index=None):
        c = self.config
        pdt = jnp.dtype(c.param_dtype)
        ones = nn.initializers.ones
        attn_norm = _param(self, "post_attn_norm", ones, (c.d_model,), ("norm",), pdt)
        ffn_norm = _param(self, "post_ffn_norm", ones, (c.d_model,), ("norm",), pdt)
        attn = Attention(c, self.mesh, self.decode, name="attn")
        x = x + rms_norm(attn(x, rope_cs, mask, cache_index), attn_norm, c.rms_eps)
        self.sow("intermediates", "ffn_input", x)  # what the router reads; free unless asked for
        ffn = MoEFFN(c, self.mesh, self.decode, name="moe") if c.is_moe else DenseFFN(c, self.mesh, name="mlp")
        y, aux = ffn(x, route_bias, positions, segment_ids)
        x = x + rms_norm(y, ffn_norm, c.rms_eps)
        return constrain(x, ("batch", "length", "act_embed"), self.mesh), aux


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    """Embedding, the scanned stack of blocks, final norm and output head.

    ``decode=True`` runs against a KV cache (see :func:`init_cache`,
    :func:`decode_step`): ``tokens`` [B, S] are the next S tokens of every row,
    written at the cache's ``index``; their ``segment_ids`` are stored in the
    cache so later queries only see keys of their own segment (0 = left padding).
    The parameters are the same in both modes.
    """
    config: ModelConfig
    mesh: Mesh | None = None
    decode: bool = False

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, route_bias=None):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.init_std)
        embed = _param(self, "embed", init, (c.vocab_size, c.d_model), ("vocab", "embed"), pdt)
        x = constrain(jnp.take(embed, tokens, axis=0).astype(dt), ("batch", "length", "act_embed"), self.mesh)

        s = tokens.shape[1]
        if self.decode:
            if not self.has_variable("cache", "index"):
                raise UserError("decoding needs a cache: build one with model.init_cache(config, batch, max_len)")
            index = self.variable("cache", "index", None)
            seg_cache = self.variable("cache", "segment_ids", None)
            start = index.value
            seg_cache.value = jax.lax.dynamic_update_slice(
                seg_cache.value, segment_ids.astype(seg_cache.value.dtype), (0, start))
            index.value = start + s
            slots = jnp.arange(seg_cache.value.shape[1], dtype=jnp.int32)
            causal = slots[None, :] <= start + jnp.arange(s, dtype=jnp.int32)[:, None]  # [S, M]
            mask = causal[None, None] & (segment_ids[:, None, :, None] == seg_cache.value[:, None, None, :])
        else:
            causal = jnp.tril(jnp.ones((s, s), dtype=bool))
            mask = causal[None, None] & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        if self.decode:  # per-layer KV cache stacked on the layer axis like the params; no remat (no gradients)
            stack = nn.scan(Block, variable_axes={"params": 0, "intermediates": 0, "cache": 0},
                            split_rngs={"params": True}, in_axes=(nn.broadcast,) * 6, length=c.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            rope_cs = rope_tables(positions, c.head_size, c.rope_theta)
            x, aux = stack(c, self.mesh, True, name="layers")(x, rope_cs, mask, route_bias, positions, segment_ids,
                                                              start)
        else:
            stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast,) * 5, length=c.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            rope_cs = rope_tables(positions, c.head_size, c.rope_theta)
            x, aux = stack(c, self.mesh, name="layers")(x, rope_cs, mask, route_bias, positions, segment_ids)

        final_norm = _param(self, "final_norm", nn.initializers.ones, (c.d_model,), ("norm",), pdt)
        lm_head = _param(self, "lm_head", init, (c.d_model, c.vocab_size), ("embed", "vocab"), pdt)
        x = rms_norm(x, final_norm, c.rms_eps)
        logits = jnp.dot(x, lm_head.astype(dt), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"), self.mesh), aux


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
#
# The cache is a plain pytree, separate from the params (which are unchanged):
#   index        []                  int32  next slot to write (same for every row)
#   segment_ids  [B, M]              int32  segment of each written slot (0 = padding)
#   layers/attn/key, value  [L, B, M, Hk, hd]  config.dtype
# M (the cache length) is fixed when the cache is made, so every call has static
# shapes. Rows of different prompt lengths are left-padded with segment 0: every
# row then writes the same slot each step while its RoPE positions stay its own.

Cache = dict[str, Any]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
    """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
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
