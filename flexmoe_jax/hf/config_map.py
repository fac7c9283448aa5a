"""HF ``config.json`` <-> :class:`ModelConfig`: FlexOlmoForCausalLM (``flex_olmo``) and Olmo2ForCausalLM (``olmo2``).

What HF can express but the model cannot (tied embeddings, attention bias,
another activation, scaled RoPE) raises :class:`HFFormatError`, never silently dropped.
"""

from __future__ import annotations

from typing import Any

from flexmoe_jax.config import ConfigError, ModelConfig
from flexmoe_jax.errors import UserError

# model_type -> (architecture class, defaults transformers uses when config.json omits a key).
SUPPORTED = {
    "flex_olmo": ("FlexOlmoForCausalLM", {"rope_theta": 500000.0, "rms_norm_eps": 1e-6,
                                         "max_position_embeddings": 4096}),
    "olmo2": ("Olmo2ForCausalLM", {"rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                                  "max_position_embeddings": 2048}),
}


class HFFormatError(UserError):
    """An HF checkpoint (or an export request) that this mapping cannot represent faithfully."""


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

