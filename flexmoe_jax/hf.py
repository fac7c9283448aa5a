"""HF transformers checkpoints in and out: FlexOlmoForCausalLM and Olmo2ForCausalLM.

The released FlexOlmo models live on the Hub as ``FlexOlmoForCausalLM``
(``model_type: flex_olmo``) and the public dense anchor as ``Olmo2ForCausalLM``
(``model_type: olmo2``); transformers is our numerical oracle. This module maps
their on-disk layout (config.json + safetensors, single file or sharded) to our
``(ModelConfig, params)`` and back, with numpy and safetensors only: importing
or exporting a model never needs torch or transformers installed.

Layout differences handled here (see the parameter tree in ``model.py``):

- torch ``Linear`` weights are ``[out, in]``; our kernels are ``[in, out]``
  (``x @ W``), so every projection (and ``lm_head``) is transposed. Embeddings,
  norms and the router (``[E, d]`` in both) are not.
- HF stores one tensor per layer (and per expert); we stack layers on axis 0
  and experts on axis 1 so ``nn.scan`` and expert slicing are cheap.
- ``save_pretrained`` writes experts one by one
  (``mlp.experts.{e}.{gate,up,down}_proj.weight``); a live FlexOlmo
  ``state_dict()`` holds them fused (``mlp.experts.gate_up_proj`` [E, 2h, d],
  ``mlp.experts.down_proj`` [E, d, h]). Both are read; the per-expert form is
  written, because that is what transformers itself writes and reads.

Anything HF can express that our model cannot (tied embeddings, attention
bias, another activation, scaled RoPE, a router bias on export) is refused
with an ``HFFormatError`` that names the problem, never silently dropped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model as model_lib
from flexmoe_jax.config import ConfigError, ModelConfig
from flexmoe_jax.errors import UserError

Params = dict[str, Any]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# model_type -> (architecture class, defaults transformers uses when config.json omits a key).
SUPPORTED = {
    "flex_olmo": ("FlexOlmoForCausalLM", {"rope_theta": 500000.0, "rms_norm_eps": 1e-6,
                                         "max_position_embeddings": 4096}),
    "olmo2": ("Olmo2ForCausalLM", {"rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                                  "max_position_embeddings": 2048}),
}


class HFFormatError(UserError):
    """An HF checkpoint (or an export request) that this mapping cannot represent faithfully."""


# ----------------------------------------------------------------------------
# Config mapping
# ----------------------------------------------------------------------------

def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """An HF config dict (config.json) -> our ModelConfig, refusing what we cannot run."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        supported = ", ".join(f"{t} ({arch})" for t, (arch, _) in SUPPORTED.items())
        raise HFFormatError(f"{where} has model_type {model_type!r}; flexmoe_jax imports only {supported}. "
                            "Convert the model to one of those architectures first.")
    defaults = SUPPORTED[model_type][1]

    def require(key):
        if key not in hf:
            raise HFFormatError(f"{where} has no {key!r}; it is required to build a {model_type} model")
        return hf[key]

    # Features transformers supports for these classes but our model does not implement.
    if hf.get("tie_word_embeddings", False):
        raise HFFormatError(f"{where} sets tie_word_embeddings=true; FlexOlmo/OLMo-2 use an untied "
                            "lm_head and so does flexmoe_jax. Untie (copy the embedding into "
                            "lm_head.weight) and set tie_word_embeddings=false.")
    if hf.get("attention_bias", False):
        raise HFFormatError(f"{where} sets attention_bias=true; flexmoe_jax's attention has no biases. "
                            "Only bias-free q/k/v/o projections can be imported.")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"{where} has hidden_act={hf['hidden_act']!r}; flexmoe_jax implements only "
                            "the SwiGLU FFN with silu.")
    theta = _rope_theta(hf, defaults["rope_theta"], where)

    is_moe = model_type == "flex_olmo"
    d, heads = int(require("hidden_size")), int(require("num_attention_heads"))
    kv = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim")
    # Keep the canonical "None = default" form so a config survives to_hf/from_hf unchanged.
    if head_dim is not None and d % heads == 0 and int(head_dim) == d // heads:
        head_dim = None
    eos = hf.get("eos_token_id")
    if isinstance(eos, (list, tuple)):  # instruct models list several; ModelConfig holds one
        eos = eos[0] if eos else None

    fields = dict(
        vocab_size=int(require("vocab_size")), d_model=d, n_layers=int(require("num_hidden_layers")),
        n_heads=heads, n_kv_heads=None if int(kv) == heads else int(kv),
        head_dim=None if head_dim is None else int(head_dim),
        mlp_hidden=int(require("intermediate_size")),
        rope_theta=theta, max_seq_len=int(hf.get("max_position_embeddings", defaults["max_position_embeddings"])),
        rms_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        init_std=float(hf.get("initializer_range", 0.02)),
        pad_token_id=hf.get("pad_token_id"), eos_token_id=eos,
    )
    if is_moe:
        num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 7)))
        names = hf.get("flexmoe_expert_names") or ()
        if names and len(names) != num_experts:
            raise HFFormatError(f"{where} lists {len(names)} flexmoe_expert_names for {num_experts} experts; "
                                "fix or remove flexmoe_expert_names")
        fields.update(num_experts=num_experts, top_k=int(hf.get("num_experts_per_tok", 5)),
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)), expert_names=tuple(names))
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HFFormatError(f"{where} describes a model flexmoe_jax cannot build: {e}") from e


def _rope_theta(hf: dict[str, Any], default: float, where: str) -> float:
    """RoPE base from transformers 5 ``rope_parameters`` or an older top-level ``rope_theta``."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    for source in (params, legacy):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type != "default":
            raise HFFormatError(f"{where} uses rope_type={rope_type!r}; flexmoe_jax implements only the "
                                "default (unscaled) RoPE that FlexOlmo and OLMo-2 use.")
        if source.get("partial_rotary_factor", 1.0) != 1.0:
            raise HFFormatError(f"{where} sets partial_rotary_factor={source['partial_rotary_factor']}; "
                                "flexmoe_jax rotates the full head dimension only.")
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """Our ModelConfig -> an HF config.json dict that transformers loads unchanged.

    ``head_dim`` is always written as a number: HF reads it with ``getattr`` and
    a ``null`` there would break its attention.
    """
    model_type = "flex_olmo" if config.is_moe else "olmo2"
    hf = {
        "architectures": [SUPPORTED[model_type][0]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.rms_eps,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": config.eos_token_id,
        "dtype": dtype,
    }
    if config.is_moe:
        hf.update({
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.top_k,
            "norm_topk_prob": config.norm_topk_prob,
            "output_router_logits": False,
            # FlexOlmo trains with the load-balancing loss disabled.
            "router_aux_loss_coef": 0.0,
            "flexmoe_expert_names": list(config.names),
        })
    return hf


# ----------------------------------------------------------------------------
# Tensor mapping
# ----------------------------------------------------------------------------

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


class _Source:
    """Named arrays with shapes and dtypes knowable before reading them (safetensors or a dict)."""

    def __init__(self, names, shape, dtype, load, where):
        self.names, self.shape, self.dtype, self.load, self.where = set(names), shape, dtype, load, where


def _dict_source(state: dict[str, Any]) -> _Source:
    state = {k: np.asarray(v) for k, v in state.items()}
    return _Source(state, lambda n: tuple(state[n].shape), lambda n: state[n].dtype,
                   lambda n: state[n], "the state dict")


def _convert_in(config: ModelConfig, src: _Source, dtype=None) -> tuple[ModelConfig, Params]:
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


def _hf_tensors(config: ModelConfig, params: Params) -> Iterator[tuple[str, tuple, np.dtype, Callable]]:
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


def _check_exportable(config: ModelConfig, params: Params) -> Params:
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
                                "differently. Drop or fold the bias (as the reference merge does) first.")
        moe = {k: v for k, v in params["layers"]["moe"].items() if k != "bias"}
        params = {**params, "layers": {**params["layers"], "moe": moe}}
    return params


def params_to_hf_state(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Our params -> the HF state dict save_pretrained writes (per-expert names, [out, in] weights)."""
    params = _check_exportable(config, params)
    return {name: thunk() for name, _, _, thunk in _hf_tensors(config, params)}


def hf_state_to_params(config: ModelConfig, state: dict[str, Any], *, dtype=None) -> Params:
    """An HF state dict (numpy arrays; per-expert or fused experts) -> our params for ``config``."""
    return _convert_in(config, _dict_source(state), dtype)[1]


# ----------------------------------------------------------------------------
# Disk
# ----------------------------------------------------------------------------

_SAFETENSORS_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}


@contextlib.contextmanager
def _safetensors_source(path: Path) -> Iterator[_Source]:
    """The tensors of a single-file or sharded safetensors checkpoint, read lazily per tensor."""
    from safetensors import safe_open

    if (path / INDEX_NAME).exists():
        try:
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise HFFormatError(f"{path / INDEX_NAME} is not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).exists():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" It holds {other[:3]}: re-save with save_pretrained(..., safe_serialization=True)."
                if other else "")
        raise HFFormatError(f"no weights in {path}: expected {WEIGHTS_NAME} or {INDEX_NAME}.{hint}")
    for f in files:
        if not (path / f).exists():
            raise HFFormatError(f"shard {f} listed in {path / INDEX_NAME} is missing; the download or copy "
                                "is incomplete")
    with contextlib.ExitStack() as stack:
        handles, keys = {}, {}
        for f in files:
            try:
                handles[f] = stack.enter_context(safe_open(str(path / f), framework="np"))
            except Exception as e:  # safetensors raises its own error types for a damaged header
                raise HFFormatError(f"{path / f} is not a readable safetensors file ({e}); "
                                    "re-download or re-save it") from e
            keys[f] = set(handles[f].keys())
        if weight_map is None:
            weight_map = dict.fromkeys(keys[WEIGHTS_NAME], WEIGHTS_NAME)
        for name, f in weight_map.items():
            if name not in keys[f]:
                raise HFFormatError(f"{path / INDEX_NAME} says {name} is in {f}, but it is not there")

        def shape(n):
            return tuple(handles[weight_map[n]].get_slice(n).get_shape())

        def dtype(n):
            code = handles[weight_map[n]].get_slice(n).get_dtype()
            if code not in _SAFETENSORS_FLOATS:
                raise HFFormatError(f"tensor {n} in {path} has dtype {code}; only float tensors can be imported")
            return _SAFETENSORS_FLOATS[code]

        yield _Source(weight_map, shape, dtype, lambda n: handles[weight_map[n]].get_tensor(n), str(path))


def from_hf(path: str | Path, *, dtype=None) -> tuple[ModelConfig, Params]:
    """Load a local HF FlexOlmoForCausalLM / Olmo2ForCausalLM directory as ``(config, params)``.

    Params are host numpy arrays in the dtype stored on disk (bf16 stays bf16),
    or ``dtype`` if given; place them with ``jax.device_put``. The config's
    ``param_dtype`` says which; its compute ``dtype`` stays float32.
    """
    path = Path(path)
    if not path.is_dir():
        raise HFFormatError(f"{path} is not a directory; from_hf needs a local HF model directory "
                            "(download it first, e.g. with huggingface_hub.snapshot_download)")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise HFFormatError(f"no {CONFIG_NAME} in {path}; is this an HF transformers model directory?")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise HFFormatError(f"{cfg_file} is not valid JSON: {e}") from e
    config = config_from_hf(hf, str(cfg_file))
    with _safetensors_source(path) as src:
        return _convert_in(config, src, dtype)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or an HF-style string ("5GB" = 5e9 bytes, "500MiB" = 500 * 2**20)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise HFFormatError(f"max_shard_size {size!r} is not a size; use bytes or e.g. '5GB', '500MB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise HFFormatError(f"max_shard_size must be positive, got {size!r}")
    return value


def _plan_shards(entries, max_bytes: int | None) -> list[list]:
    """Greedy, in order (as transformers does): a new shard when the next tensor would overflow."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def to_hf(config: ModelConfig, params: Params, path: str | Path, *, max_shard_size: int | str | None = None,
          overwrite: bool = False) -> Path:
    """Write ``(config, params)`` as an HF model directory transformers loads with from_pretrained.

    MoE configs become FlexOlmoForCausalLM, dense ones Olmo2ForCausalLM; our
    expert names ride along in config.json as ``flexmoe_expert_names``. With
    ``max_shard_size`` (bytes or "5GB") the weights are split into shards plus
    ``model.safetensors.index.json``. Everything is written into a temporary
    directory beside ``path`` and renamed into place, so a crash never leaves a
    half-written model. An existing non-empty ``path`` is replaced only with
    ``overwrite=True``.
    """
    path = Path(path)
    params = _check_exportable(config, params)
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise HFFormatError(f"{path} already exists and is not empty; pass overwrite=True or pick a new path")
    from safetensors.numpy import save_file

    entries = list(_hf_tensors(config, params))
    shards = _plan_shards(entries, max_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        hf_cfg = config_to_hf(config, np.dtype(entries[0][2]).name)
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        weight_map, total = {}, 0
        for n, shard in enumerate(shards, 1):
            fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: thunk() for name, _, _, thunk in shard}
            # transformers refuses safetensors files whose metadata format is not "pt".
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.nbytes for t in tensors.values())
            weight_map.update({name: fname for name in tensors})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / "x")
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
