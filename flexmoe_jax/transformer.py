"""The FlexOlmo / OLMo-2 transformer as Flax linen modules (parameters declared with logical axes).

Block semantics are the reference's "reordered norm": ``h = x + norm(attn(x))``,
``out = h + norm(ffn(h))``, QK-norm over the full q/k width before the head
split, RoPE, untied output head, router on the raw residual stream. Layers are
stacked on a leading ``layers`` axis by ``nn.scan``. The public API over these
modules is :mod:`flexmoe_jax.model`; design notes: docs/model.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from flexmoe_jax import layers, moe as moe_lib, optim
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.layers import attention, rms_norm, rope, rope_tables
from flexmoe_jax.sharding import constrain


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Attention(nn.Module):
    """GQA self-attention with QK-norm and RoPE.

    With ``decode=True`` the layer keeps its keys and values in the ``cache``
    collection (``key``/``value`` [B, M, Hk, hd], M fixed when the cache is made
    by :func:`flexmoe_jax.model.init_cache`): the S new keys/values are written at slots
    ``[cache_index, cache_index + S)`` and the queries attend over all M slots
    under ``mask`` [B, 1, S, M] (built by :class:`Transformer`). One code path
    serves a whole-prompt prefill (S = prompt length) and a one-token step.
    Where :func:`~flexmoe_jax.layers.attention_kind` says "splash" (auto on TPU), the
    kernel applies the causal mask within ``segment_ids`` [B, S] itself and ``mask`` is None.
    """
    config: ModelConfig
    mesh: Mesh | None = None
    decode: bool = False
    # False: return the final normalized hidden states [B, S, d] (compute dtype) instead of the logits,
    # for a loss that applies the head itself (flexmoe_jax.lm_loss); the parameters are the same.
    head: bool = True

    @nn.compact
    def __call__(self, x, rope_cs, mask, cache_index=None, segment_ids=None):
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
        kind = layers.attention_kind(c.attention_impl, layers.mesh_backend(self.mesh), s, self.decode)
        if kind == "splash":
            out = layers.sharded_splash_attention(q, k, v, segment_ids, self.mesh)
        else:
            out = attention(q, k, v, mask, kind)
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
    # False: return the final normalized hidden states [B, S, d] (compute dtype) instead of the logits,
    # for a loss that applies the head itself (flexmoe_jax.lm_loss); the parameters are the same.
    head: bool = True

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
            backend = None if self.mesh is None else self.mesh.devices.flat[0].platform  # AOT: the target's
            y = moe_lib.dispatch(flat, routing, experts, c.moe_impl, c.moe_block_size, backend)
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

        Pieces come from ``optim.combine(..., concat_slots=False)`` in the training step and
        are joined only here, so a frozen piece gets no weight gradients (docs/model.md).
        """
        cut = [(optim.parse_slot_key(k), k) for k in self.variables.get("params", {})]
        pieces = sorted((slot, k) for (base, slot), k in cut if base == name and slot is not None)
        if not pieces:
            return [_param(self, name, init, shape, axes, dtype)]
        return [self.get_variable("params", k) for _, k in pieces]


class Block(nn.Module):
    config: ModelConfig
    mesh: Mesh | None = None
    decode: bool = False
    # False: return the final normalized hidden states [B, S, d] (compute dtype) instead of the logits,
    # for a loss that applies the head itself (flexmoe_jax.lm_loss); the parameters are the same.
    head: bool = True

    @nn.compact
    def __call__(self, x, rope_cs, mask, route_bias=None, positions=None, segment_ids=None, cache_index=None):
        c = self.config
        pdt = jnp.dtype(c.param_dtype)
        ones = nn.initializers.ones
        attn_norm = _param(self, "post_attn_norm", ones, (c.d_model,), ("norm",), pdt)
        ffn_norm = _param(self, "post_ffn_norm", ones, (c.d_model,), ("norm",), pdt)
        attn = Attention(c, self.mesh, self.decode, name="attn")
        x = x + rms_norm(attn(x, rope_cs, mask, cache_index, segment_ids), attn_norm, c.rms_eps)
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

    ``decode=True`` runs against a KV cache (see :func:`flexmoe_jax.model.init_cache`,
    :func:`~flexmoe_jax.model.decode_step`): ``tokens`` [B, S] are the next S tokens of every row,
    written at the cache's ``index``; their ``segment_ids`` are stored in the
    cache so later queries only see keys of their own segment (0 = left padding).
    The parameters are the same in both modes.
    """
    config: ModelConfig
    mesh: Mesh | None = None
    decode: bool = False
    # False: return the final normalized hidden states [B, S, d] (compute dtype) instead of the logits,
    # for a loss that applies the head itself (flexmoe_jax.lm_loss); the parameters are the same.
    head: bool = True

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
        elif layers.attention_kind(c.attention_impl, layers.mesh_backend(self.mesh), s, False) == "splash":
            mask = None  # the kernel masks by segment_ids itself: no [B, 1, S, S] mask
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
        if not self.head:
            return x, aux
        logits = jnp.dot(x, lm_head.astype(dt), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"), self.mesh), aux

