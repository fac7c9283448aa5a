"""The one model configuration: dense OLMo-2 and FlexOlmo MoE share it.

A frozen dataclass so it is hashable (it is a static argument of every jitted
function) and gin-configurable (``ModelConfig.d_model = 512`` in a gin file).
``num_experts == 0`` means a dense OLMo-2 model (one SwiGLU FFN per layer);
``num_experts >= 1`` means the FlexOlmo MoE with a router over named experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util  # noqa: F401  (gin 0.5 uses importlib.util without importing it)
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import gin

from flexmoe_jax.errors import UserError

MOE_IMPLS = ("auto", "dense", "ragged", "gmm", "blocks")
REMAT_POLICIES = ("none", "full", "dots")
ROUTINGS = ("top_k", "public_plus", "document_top_k", "document_public_plus")
ATTENTION_IMPLS = (None, "xla", "splash", "cudnn")
# How a model picks experts at inference, not what it is: left out of anchor fingerprints.
INFERENCE_FIELDS = ("routing", "router_score", "router_temperature")
# What must agree for two models' tensors to fit together (an anchor and its experts, a soup's
# members): the shapes and the numerics of the shared layers, then the stored dtype.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "head_size", "mlp_hidden",
                "rope_theta", "rms_eps")
ARCH_FIELDS = SHAPE_FIELDS + ("param_dtype",)


def arch_diff(a: "ModelConfig", b: "ModelConfig", fields=ARCH_FIELDS) -> dict[str, tuple[Any, Any]]:
    """``{field: (a's, b's)}`` for every field of ``fields`` where two configs differ."""
    return {k: (getattr(a, k), getattr(b, k)) for k in fields if getattr(a, k) != getattr(b, k)}


class ConfigError(UserError):
    """A configuration that cannot describe a valid model."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and semantics of a FlexOlmo / OLMo-2 model.

    Defaults are the tiny model used by tests and the demo; the released
    FlexOlmo-7x7B is ``d_model=4096, n_layers=32, n_heads=32, mlp_hidden=11008,
    vocab_size=100352, num_experts=7, top_k=5``.
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # None means full multi-head attention (n_kv_heads == n_heads).
    n_kv_heads: int | None = None
    # None means d_model // n_heads.
    head_dim: int | None = None
    mlp_hidden: int = 688
    # 0: dense OLMo-2 FFN. >= 1: FlexOlmo MoE with this many experts.
    num_experts: int = 0
    top_k: int = 1
    # One name per expert, in slot order. Empty means ("public", "expert_1", ...).
    expert_names: tuple[str, ...] = ()
    # FlexOlmo does not renormalize the top-k softmax weights (HF norm_topk_prob=False).
    norm_topk_prob: bool = False
    # A learned per-expert router logit bias, clamped to <= 0 in the forward pass.
    expert_bias: bool = False
    # How router logits pick experts (see flexmoe_jax.moe.route): "top_k" (the reference),
    # "public_plus" (the public expert always, plus the top-(k-1) others), and "document_" versions
    # of both (each layer's logits averaged causally over the document so far before choosing).
    routing: str = "top_k"
    # Router scores: "dot" (the reference: rows . residual) or "cosine" (PHATGOOSE-style: unit rows .
    # unit residual / router_temperature), which makes rows trained apart comparable in scale.
    router_score: str = "dot"
    router_temperature: float = 0.1
    rope_theta: float = 500000.0
    max_seq_len: int = 4096
    rms_eps: float = 1e-6
    # MoE dispatch: "auto" picks dense when every expert is active, else the
    # fastest sparse path for the backend ("blocks" on CPU, "gmm" on TPU, "ragged" elsewhere).
    moe_impl: str = "auto"
    # Rows per block of the CPU block-sparse dispatch.
    moe_block_size: int = 512
    # Compute dtype for activations and matmuls; parameters keep param_dtype.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    init_std: float = 0.02
    # Attention (flexmoe_jax.layers.attention_kind): None = auto ("splash" on TPU, else "xla"), "xla"
    # (the XLA form), "splash" (JAX's Pallas TPU kernel, interpreted off TPU: slow) or "cudnn" (GPU).
    attention_impl: str | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        def fail(msg):
            raise ConfigError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "max_seq_len"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.kv_heads:
            fail(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            fail(f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); set head_dim")
        if self.head_size % 2:
            fail(f"head_dim must be even for RoPE, got {self.head_size}")
        if self.num_experts < 0:
            fail(f"num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.top_k <= self.num_experts:
                fail(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
            if self.expert_names:
                if len(self.expert_names) != self.num_experts:
                    fail(f"{len(self.expert_names)} expert_names for {self.num_experts} experts")
                if len(set(self.expert_names)) != len(self.expert_names):
                    fail(f"expert_names must be unique, got {self.expert_names}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.router_score not in ("dot", "cosine"):
            fail(f"router_score must be 'dot' or 'cosine', got {self.router_score!r}")
        if not self.router_temperature > 0:
            fail(f"router_temperature must be positive, got {self.router_temperature}")
        if self.routing not in ROUTINGS:
            fail(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.num_experts and self.routing.endswith("public_plus") and "public" not in self.names:
            fail(f"routing={self.routing!r} keeps the 'public' expert always active, but the experts are "
                 f"{list(self.names)}; use routing='top_k' or keep 'public'")
        if self.moe_impl not in MOE_IMPLS:
            fail(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.remat not in REMAT_POLICIES:
            fail(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.moe_block_size <= 0:
            fail(f"moe_block_size must be positive, got {self.moe_block_size}")
        if not isinstance(self.expert_names, tuple):
            object.__setattr__(self, "expert_names", tuple(self.expert_names))

    # Derived sizes -----------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def names(self) -> tuple[str, ...]:
        """Expert names in slot order (slot 0 is the public expert)."""
        if self.expert_names:
            return self.expert_names
        return tuple("public" if i == 0 else f"expert_{i}" for i in range(self.num_experts))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, h, v, L = self.d_model, self.mlp_hidden, self.vocab_size, self.n_layers
        q, kv = self.n_heads * self.head_size, self.kv_heads * self.head_size
        attn = d * q * 2 + d * kv * 2 + q + kv
        e = max(self.num_experts, 1)
        ffn = 3 * d * h * e + (d * e + (e if self.expert_bias else 0) if self.is_moe else 0)
        return 2 * v * d + d + L * (attn + ffn + 2 * d)

    # Serialization ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # empty = the default names, kept empty so from_dict(to_dict(c)) == c
        d["expert_names"] = list(self.expert_names)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown fields {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if "expert_names" in d:
            d["expert_names"] = tuple(d["expert_names"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def tiny(**overrides: Any) -> ModelConfig:
    """A small FlexOlmo MoE for tests and quick demos."""
    base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp_hidden=96,
                num_experts=4, top_k=2, max_seq_len=128)
    base.update(overrides)
    return ModelConfig(**base)


def _gin_dir() -> pathlib.Path:
    """The gin files: shipped in the package (``flexmoe_jax.gin_configs``, a regular install), else the
    checkout's top-level ``gin_configs/`` (an editable install made before they were package data)."""
    try:
        import importlib.resources

        d = pathlib.Path(str(importlib.resources.files("flexmoe_jax.gin_configs")))
        if (d / "phase").is_dir():
            return d
    except (ImportError, TypeError):
        pass
    return pathlib.Path(__file__).resolve().parent.parent / "gin_configs"


GIN_DIR = _gin_dir()


@contextlib.contextmanager
def gin_scope(files: Sequence[str] = (), bindings: Sequence[str] = ()):
    """Parse gin files and ``K=V`` bindings (t5x style) for the duration of a ``with`` block.

    A file name that does not exist as given is looked up under ``gin_configs/``
    (so ``model/olmo2_7b.gin`` works from anywhere); includes resolve against the
    including file's directory and ``gin_configs/``. Yields the operative config text.
    """
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_DIR))
    resolved = []
    for f in files:
        path = f if os.path.exists(f) else os.path.join(GIN_DIR, f)
        if not os.path.exists(path):
            raise FileNotFoundError(f"gin file {f!r} not found (looked in the current directory and {GIN_DIR})")
        gin.add_config_file_search_path(os.path.dirname(os.path.abspath(path)))
        resolved.append(path)
    try:
        logging.disable(logging.ERROR)  # gin logs an error for every search path an include is not in
        try:
            gin.parse_config_files_and_bindings(resolved, list(bindings))
        except (ValueError, SyntaxError) as e:  # an unknown name, a bad value, a typo in a file
            raise UserError(f"gin config ({', '.join(resolved + list(bindings)) or 'no files'}): {e}") from e
        finally:
            logging.disable(logging.NOTSET)
        yield gin.config_str()
    finally:
        gin.clear_config()


def from_gin(files: Sequence[str] = (), bindings: Sequence[str] = ()) -> ModelConfig:
    """A ModelConfig from gin files and bindings (see :func:`gin_scope`)."""
    with gin_scope(files, bindings):
        return ModelConfig()
