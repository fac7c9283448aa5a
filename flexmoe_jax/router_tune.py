"""After the merge: router tuning on proxy data, and a cheap public-data bias calibration.

- :func:`tune`: freeze everything but the router rows and train them on public documents that the
  merged router already scores as each expert's (plus plain public data); no owner data.
- :func:`calibrate_bias`: lower each expert's (clamped, <= 0) bias by its mean (or ``quantile``)
  router-logit margin over the public expert on public data, so no expert outranks the public one
  on generic text. Why and how: docs/routing.md (After the merge).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model, moe as moe_lib
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError


def _require_moe(config: ModelConfig, what: str) -> None:
    if not config.is_moe or config.num_experts < 2:
        raise UserError(f"{what} needs a merged MoE with at least 2 experts; this model has "
                        f"{config.num_experts} (merge experts first: flexmoe merge)")


# ----------------------------------------------------------------------------
# Proxy data for router tuning
# ----------------------------------------------------------------------------

def document_gates(config: ModelConfig, params: model.Params, docs: Sequence[Sequence[int]],
                   seq_len: int = 128, batch_size: int = 16) -> np.ndarray:
    """[N, E]: each document's mean routing weight per expert, over its tokens and every layer.

    Uses the full softmax (top-k = every expert), so the score reflects how well
    the document aligns with each expert's router rows, not only which k win.
    Documents are truncated to ``seq_len`` tokens; padding is excluded.
    """
    _require_moe(config, "document scoring")
    full = config.replace(top_k=config.num_experts)
    fn = jax.jit(lambda p, t, s: model.apply(full, p, t, None, s)[1]["gates"])
    out = np.zeros((len(docs), config.num_experts), np.float64)
    for start in range(0, len(docs), batch_size):
        chunk = [list(d[:seq_len]) or [0] for d in docs[start:start + batch_size]]
        toks = np.zeros((batch_size, seq_len), np.int32)
        seg = np.zeros((batch_size, seq_len), np.int32)
        for i, d in enumerate(chunk):
            toks[i, :len(d)] = d
            seg[i, :len(d)] = 1
        gates = np.asarray(fn(params, toks, seg), np.float64).mean(axis=0)  # [B, S, E], mean over layers
        w = seg.astype(np.float64)[:, :, None]
        per_doc = (gates * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1.0)
        out[start:start + len(chunk)] = per_doc[:len(chunk)]
    return out


def public_pool(data_dir, size: int, seed: int = 0) -> list[str]:
    """A deterministic sample of public training documents (the builder's own data)."""
    from flexmoe_jax.data import PUBLIC_SOURCES
    from flexmoe_jax.data.pipeline import read_split_texts

    texts = [t for cfg in PUBLIC_SOURCES for t in read_split_texts(data_dir, "flexmix_mini", cfg, "train")]
    if not texts:
        raise FileNotFoundError(f"no public training documents in {data_dir}; run `flexmoe data build "
                                f"--data_dir {data_dir}` first")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(texts))[:size]
    return [texts[i] for i in sorted(idx)]


def select_proxy(config: ModelConfig, params: model.Params, texts: Sequence[str], tokenize,
                 per_expert: int, public: int, seq_len: int = 128, seed: int = 0) -> tuple[list[str], dict]:
    """Proxy documents: the ``per_expert`` best-scoring public documents of every non-public
    expert, plus ``public`` other documents drawn at random. Returns (texts, report)."""
    _require_moe(config, "proxy selection")
    scores = document_gates(config, params, [tokenize(t) for t in texts], seq_len)
    chosen: dict[int, None] = {}
    report: dict = {"pool": len(texts), "experts": {}}
    for e, name in enumerate(config.names):
        if e == 0:
            continue  # the public expert's proxy is the random public sample below
        top = np.argsort(-scores[:, e], kind="stable")[:per_expert]
        chosen.update(dict.fromkeys(int(i) for i in top))
        report["experts"][name] = {"docs": len(top), "mean_gate": float(scores[top, e].mean()),
                                   "pool_mean_gate": float(scores[:, e].mean())}
    rest = [i for i in range(len(texts)) if i not in chosen]
    rng = np.random.default_rng(seed + 1)
    extra = rng.permutation(len(rest))[:public]
    chosen.update(dict.fromkeys(rest[i] for i in sorted(extra)))
    report["public_docs"] = int(len(extra))
    report["total_docs"] = len(chosen)
    return [texts[i] for i in chosen], report


def tune(ckpt, out, data_dir, *, gin_files: Sequence[str] = (), gin_params: Sequence[str] = (),
         top_k: int | None = None, per_expert: int = 256, public: int = 512, pool: int = 4096,
         include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
         progress: bool = True) -> dict:
    """``flexmoe tune-router``: select proxy data, then train only the router rows.

    The merged model at ``ckpt`` is loaded (optionally with experts opted in/out),
    its top-k set to ``top_k`` if given (the reference tunes with every expert
    active), proxy documents are chosen from ``pool`` public training documents
    and registered as a local task, and the ``router_tune`` phase trains on it
    into ``out`` (resumable like every run; the tuned model lands in ``out/model``).
    """
    from flexmoe_jax import data, loading, optim, train, trainer
    from flexmoe_jax.config import gin_scope

    config, params = loading.load(ckpt, include=include, exclude=exclude)
    _require_moe(config, "router tuning")
    if top_k is not None:
        if not 1 <= top_k <= config.num_experts:
            raise UserError(f"--top_k must be between 1 and the {config.num_experts} experts, got {top_k}")
        config = config.replace(top_k=top_k)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sp = data.sentencepiece(data_dir)
    texts = public_pool(data_dir, pool)
    proxy, report = select_proxy(config, jax.device_get(params), texts, sp.encode, per_expert, public)
    # Named by what it holds, not where the checkpoint lives: the name seeds the batch order, so the same
    # model and settings tune the same way in any directory.
    key = hashlib.sha256(json.dumps([list(config.names), per_expert, public, pool,
                                     hashlib.sha256("\x00".join(proxy).encode()).hexdigest()]).encode())
    task = f"router_proxy_{key.hexdigest()[:12]}"
    proxy_file = out / "proxy.jsonl"
    tmp = proxy_file.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for t in proxy:
            f.write(json.dumps({"text": t}) + "\n")
    os.replace(tmp, proxy_file)
    from flexmoe_jax.data import tasks

    if task not in tasks.owner_manifests(data_dir):
        data.register(task, str(proxy_file), data_dir, format="jsonl", progress=False, log=lambda m: None)
    (out / "proxy_report.json").write_text(json.dumps({"task": task, **report}, indent=2) + "\n")

    bindings = ['RunConfig.phase="router_tune"', f'RunConfig.task="{task}"', f'RunConfig.data_dir="{data_dir}"',
                f'RunConfig.anchor="{os.path.abspath(ckpt)}"', *gin_params]
    with gin_scope(["phase/router_tune.gin", *gin_files], bindings) as gin_text:
        rc = trainer.RunConfig()
        ocfg, loss_cfg = optim.OptimConfig(), train.LossConfig()
    result = trainer.run(out, config, rc, ocfg, loss_cfg, params=params, progress=progress, gin_text=gin_text)
    result["proxy"] = {"task": task, **report}
    return result


# ----------------------------------------------------------------------------
# Bias calibration on public data
# ----------------------------------------------------------------------------

def _layer_logits(config: ModelConfig, h: jax.Array, router: jax.Array, bias: jax.Array | None) -> jax.Array:
    """[L, B, S, d] FFN inputs -> [L, B, S, E] router logits, each layer's as the model computes them."""
    L, B, S, d = h.shape

    def one(hl, rl, bl):
        return moe_lib.router_logits(hl.reshape(-1, d), rl, bl, config.router_score,
                                     config.router_temperature).reshape(B, S, -1)

    if bias is None:
        return jax.vmap(lambda hl, rl: one(hl, rl, None))(h, router)
    return jax.vmap(one)(h, router, bias)


def router_margins(config: ModelConfig, params: model.Params, batches: Iterable[dict], num_batches: int,
                   quantile: float | None = None) -> np.ndarray:
    """[L, E]: ``logit_e - logit_public`` at each layer's router over the real tokens of the first
    ``num_batches`` batches: its mean, or with ``quantile`` that quantile of it (0.9: the margin
    that only 10% of the tokens exceed)."""
    moe = params["layers"]["moe"]
    total, count, parts = None, 0.0, []
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        h = model.ffn_inputs(config, params, jnp.asarray(batch["decoder_input_tokens"]),
                             jnp.asarray(batch["decoder_positions"]), jnp.asarray(batch["decoder_segment_ids"]))
        logits = _layer_logits(config, h, jnp.asarray(moe["router"]),
                               jnp.asarray(moe["bias"]) if "bias" in moe else None)
        margins = logits - logits[..., :1]
        real = np.asarray(batch["decoder_loss_weights"]) > 0
        if quantile is not None:
            parts.append(np.asarray(margins)[:, real])  # [L, tokens, E]
        else:
            w = jnp.asarray(real, jnp.float32)[None, :, :, None]
            part = np.asarray(jnp.sum(margins * w, axis=(1, 2)), np.float64)
            total = part if total is None else total + part
        count += float(real.sum())
    if count == 0:
        raise UserError("no public tokens to calibrate on: the batches are empty")
    if quantile is not None:
        return np.quantile(np.concatenate(parts, axis=1).astype(np.float64), quantile, axis=1)
    return total / count


def calibrate_bias(config: ModelConfig, params: model.Params, batches: Iterable[dict], num_batches: int = 8,
                   rounds: int = 2, quantile: float | None = None) -> tuple[ModelConfig, model.Params, dict]:
    """Lower each non-public expert's per-layer bias until its mean margin over the
    public expert on public data is <= 0. Returns (config with expert_bias, params, report).

    ``batches`` must be public data; the first ``num_batches`` are the calibration set.
    The public expert's bias stays 0; every bias ends <= 0.
    """
    _require_moe(config, "calibration")
    if config.names[0] != "public":
        raise UserError(f"calibration measures margins over the public expert in slot 0; this model's "
                        f"slot 0 is {config.names[0]!r}")
    batches = list(itertools.islice(batches, num_batches))  # the same calibration set every round
    params = jax.device_get(params)
    moe = dict(params["layers"]["moe"])
    L, E = config.n_layers, config.num_experts
    bias = np.minimum(np.asarray(moe.get("bias", np.zeros((L, E))), np.float64), 0.0)
    config = config.replace(expert_bias=True)
    before = None
    for _ in range(rounds):
        moe["bias"] = bias.astype(np.asarray(moe["router"]).dtype)
        cur = {**params, "layers": {**params["layers"], "moe": moe}}
        margins = router_margins(config, cur, batches, num_batches, quantile)
        before = margins if before is None else before
        shift = np.maximum(margins, 0.0)
        shift[:, 0] = 0.0
        bias = bias - shift
    moe["bias"] = bias.astype(np.asarray(moe["router"]).dtype)
    params = {**params, "layers": {**params["layers"], "moe": moe}}
    after = router_margins(config, params, batches, num_batches, quantile)
    report = {"margin_before": before.round(4).tolist(), "margin_after": after.round(4).tolist(),
              "bias": np.asarray(moe["bias"], np.float64).round(4).tolist(), "experts": list(config.names),
              "statistic": "mean" if quantile is None else f"quantile {quantile}"}
    return config, params, report
