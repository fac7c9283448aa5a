"""HF tensor names and layouts <-> our stacked parameter tree, in both directions (numpy only).

torch ``Linear`` weights are ``[out, in]`` and ours ``[in, out]`` (transposed); HF
holds one tensor per layer and per expert, we stack them on the ``layers`` and
``expert`` axes. Experts are read per-expert (``save_pretrained``) or fused (a live
``state_dict()``) and written per-expert. Details: docs/model.md (HF interchange).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model as model_lib
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.hf.config_map import HFFormatError

Params = dict[str, Any]

# (our path under layers/, HF name under model.layers.{i}., transpose?)
_LAYER_MAP = [
    (("attn", "q_proj"), "self_attn.q_proj.weight", True),
    (("attn", "k_proj"), "self_attn.k_proj.weight", True),
    (("attn", "v_proj"), "self_attn.v_proj.weight", True),
    (("attn", "o_proj"), "self_attn.o_proj.weight", True),
    (("attn", "q_norm"), "self_attn.q_norm.weight", False),
    (("attn", "k_norm"), "self_attn.k_norm.weight", False),
    (("post_attn_norm",), "post_attention_layernorm.weight", False),
    (("post_ffn_norm",), "post_feedforward_layernorm.weight", False),
]
_DENSE_MAP = [(("mlp", w), f"mlp.{w}_proj.weight", True) for w in ("gate", "up", "down")]
_TOP_MAP = [
    (("embed",), "model.embed_tokens.weight", False),
    (("final_norm",), "model.norm.weight", False),
    (("lm_head",), "lm_head.weight", True),
]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _place(tree: Params, config: ModelConfig, path: tuple, index: tuple, arr: np.ndarray, dtype) -> None:
    """Write one HF tensor (already in our orientation) into its slot of a stacked leaf.

    The stacked leaf is allocated on first use, so a checkpoint is copied once,
    tensor by tensor, never held twice.
    """
    dst = _get(tree, path)
    if dst is None:
        dst = np.empty(_get(model_lib.param_shapes(config), path).shape, dtype)
        _set(tree, path, dst)
    dst[index] = arr


def _expected(config: ModelConfig, fused: bool = False) -> dict[str, tuple[tuple[int, ...], Callable]]:
    """Every HF tensor name -> (its HF shape, ``place(tree, hf_array, dtype)`` into our tree)."""
    shapes = model_lib.param_shapes(config)
    out = {}

    def slot(path, index, transpose):
        inner = _get(shapes, path).shape[len(index):]
        return (inner[::-1] if transpose else inner,
                lambda tree, arr, dtype: _place(tree, config, path, index, arr.T if transpose else arr, dtype))

    for path, name, t in _TOP_MAP:
        out[name] = slot(path, (), t)
    e, d, h = config.num_experts, config.d_model, config.mlp_hidden
    for i in range(config.n_layers):
        pre = f"model.layers.{i}."
        for sub, name, t in _LAYER_MAP + ([] if config.is_moe else _DENSE_MAP):
            out[pre + name] = slot(("layers",) + sub, (i,), t)
        if not config.is_moe:
            continue
        out[pre + "mlp.gate.weight"] = slot(("layers", "moe", "router"), (i,), False)
        if fused:
            # In-memory HF layout: gate_up_proj [E, 2h, d] (gate rows, then up rows), down_proj [E, d, h].
            def gate_up(tree, arr, dtype, i=i):
                _place(tree, config, ("layers", "moe", "gate"), (i,), arr[:, :h].transpose(0, 2, 1), dtype)
                _place(tree, config, ("layers", "moe", "up"), (i,), arr[:, h:].transpose(0, 2, 1), dtype)

            def down(tree, arr, dtype, i=i):
                _place(tree, config, ("layers", "moe", "down"), (i,), arr.transpose(0, 2, 1), dtype)
            out[pre + "mlp.experts.gate_up_proj"] = ((e, 2 * h, d), gate_up)
            out[pre + "mlp.experts.down_proj"] = ((e, d, h), down)
        else:
            for x in range(e):
                for w in ("gate", "up", "down"):
                    out[pre + f"mlp.experts.{x}.{w}_proj.weight"] = slot(("layers", "moe", w), (i, x), True)
    return out


class Source:
    """Named arrays with shapes and dtypes knowable before reading them (safetensors or a dict)."""

    def __init__(self, names, shape, dtype, load, where):
        self.names, self.shape, self.dtype, self.load, self.where = set(names), shape, dtype, load, where


def _dict_source(state: dict[str, Any]) -> Source:
    state = {k: np.asarray(v) for k, v in state.items()}
    return Source(state, lambda n: tuple(state[n].shape), lambda n: state[n].dtype,
                   lambda n: state[n], "the state dict")


def convert_in(config: ModelConfig, src: Source, dtype=None) -> tuple[ModelConfig, Params]:
    """Check every tensor's presence and shape first, then read and place them one at a time."""
    fused = config.is_moe and "model.layers.0.mlp.experts.gate_up_proj" in src.names
    expected = _expected(config, fused)
    missing = [n for n in expected if n not in src.names]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise HFFormatError(f"{src.where} is missing {len(missing)} tensor(s) the config requires: {shown}. "
                            "Was it saved from a different model or truncated?")
    unexpected = sorted(n for n in src.names - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise HFFormatError(f"{src.where} has tensor(s) flexmoe_jax has no place for: {shown}. "
                            "Does config.json describe this checkpoint (num_hidden_layers, num_experts)?")
    for name, (shape, _) in expected.items():
        if src.shape(name) != tuple(shape):
            raise HFFormatError(f"tensor {name} in {src.where} has shape {src.shape(name)}, but the config "
                                f"implies {tuple(shape)}; config and weights disagree")

    if dtype is None:
        # Keep what is stored; a mixed checkpoint is promoted losslessly to one dtype.
        stored = {np.dtype(src.dtype(n)) for n in expected}
        dtype = functools.reduce(jnp.promote_types, stored)
    dtype = np.dtype(jnp.dtype(dtype))
    tree = jax.tree.map(lambda _: None, model_lib.param_shapes(config))
    for name, (_, place) in expected.items():
        place(tree, src.load(name), dtype)
    config = config.replace(param_dtype=dtype.name)
    model_lib.check_params(config, tree, what=f"params from {src.where}")
    return config, tree


def hf_tensors(config: ModelConfig, params: Params) -> Iterator[tuple[str, tuple, np.dtype, Callable]]:
    """(HF name, shape, dtype, thunk) for every tensor of numpy ``params``; thunks let export stream."""
    def entry(name, path, index, transpose):
        arr = _get(params, path)
        shape = arr.shape[len(index):]

        def thunk():
            a = arr[index]
            return np.ascontiguousarray(a.T if transpose else a)
        return name, shape[::-1] if transpose else shape, arr.dtype, thunk

    for path, name, t in _TOP_MAP[:1]:
        yield entry(name, path, (), t)
    for i in range(config.n_layers):
        pre = f"model.layers.{i}."
        for sub, name, t in _LAYER_MAP + ([] if config.is_moe else _DENSE_MAP):
            yield entry(pre + name, ("layers",) + sub, (i,), t)
        if config.is_moe:
            yield entry(pre + "mlp.gate.weight", ("layers", "moe", "router"), (i,), False)
            for e in range(config.num_experts):
                for w in ("gate", "up", "down"):
                    yield entry(pre + f"mlp.experts.{e}.{w}_proj.weight", ("layers", "moe", w), (i, e), True)
    for path, name, t in _TOP_MAP[1:]:
        yield entry(name, path, (), t)


def check_exportable(config: ModelConfig, params: Params) -> Params:
    """Validate params for export as host numpy; drop an all-zero expert bias (HF has no router bias)."""
    model_lib.check_params(config, params)
    if config.pad_token_id is not None and not 0 <= config.pad_token_id < config.vocab_size:
        # transformers builds nn.Embedding(padding_idx=pad) and fails to load the model.
        raise HFFormatError(f"pad_token_id={config.pad_token_id} is outside the vocab [0, {config.vocab_size}); "
                            "transformers cannot load that. Set pad_token_id to a real token id or None.")
    if config.is_moe and config.router_score != "dot":
        raise HFFormatError(f"this model scores its router with router_score={config.router_score!r}; HF "
                            "FlexOlmoForCausalLM's router is a plain linear layer (dot scores), so the export "
                            "would route differently. Export with router_score='dot'.")
    if config.is_moe and config.routing != "top_k":
        raise HFFormatError(f"this model routes with routing={config.routing!r}; HF FlexOlmoForCausalLM routes "
                            "every token by its own top-k only (no always-on public expert, no document "
                            "averaging), so the export would compute another model. Export with routing "
                            "'top_k' (merge without --routing, or config.replace(routing='top_k')), and "
                            "know that routing modes (domain routing too) do not carry over to transformers.")
    params = jax.tree.map(np.asarray, params)  # one host copy (device arrays are gathered once)
    if config.is_moe and config.expert_bias:
        bias = params["layers"]["moe"]["bias"]
        # The forward pass clamps the bias to <= 0, so only its negative part changes routing.
        if np.any(np.minimum(bias, 0) != 0):
            raise HFFormatError("this model has a nonzero learned expert bias (layers/moe/bias); HF "
                                "FlexOlmoForCausalLM has no router bias, so the export would route "
                                "differently. Merge without it (`flexmoe merge ... --drop_bias`, the reference's "
                                "merge; keep_bias=False in flexmoe_jax.merge.merge) and export that model.")
        moe = {k: v for k, v in params["layers"]["moe"].items() if k != "bias"}
        params = {**params, "layers": {**params["layers"], "moe": moe}}
    return params


def params_to_hf_state(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Our params -> the HF state dict save_pretrained writes (per-expert names, [out, in] weights)."""
    params = check_exportable(config, params)
    return {name: thunk() for name, _, _, thunk in hf_tensors(config, params)}


def hf_state_to_params(config: ModelConfig, state: dict[str, Any], *, dtype=None) -> Params:
    """An HF state dict (numpy arrays; per-expert or fused experts) -> our params for ``config``."""
    return convert_in(config, _dict_source(state), dtype)[1]

