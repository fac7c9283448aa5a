"""Evaluation: per-domain perplexity and bits per byte, a held-out multiple-choice suite, and the
inference-time baselines (model soup, BTM ensemble), all behind one scorer interface.

Scorers
-------
Every model kind is a :class:`Scorer`: something that gives, for packed rows of tokens,
``log p(target_t | the tokens before t in its segment)``. The same :func:`evaluate` then runs a
single (config, params) model (:class:`ModelScorer`: dense, MoE, an owner's 2-expert model, or a
merged FlexOlmo with experts opted out), the model soup (:func:`soup`, a dense model) and the BTM
ensemble (:class:`BTMScorer`). Scores are computed jitted on whole batches; only per-token log
probabilities ``[B, S]`` leave the device, never logits.

Model soup (:func:`soup`, :func:`soup_scorer`)
  A soup is the uniform parameter average of models fine-tuned from one initialization
  (Wortsman et al. 2022); FlexOlmo's soup baseline averages its dense experts. Our owners do not
  train dense models, so each pool member is viewed as one: the anchor as itself (the public
  domain's model), an owner's 2-expert model as its shared tensors plus its slot-1 FFN, which is
  exactly what its training moved away from the anchor's FFN. The soup averages every tensor of
  these dense views: the FFNs, and the shared tensors too (all identical to the anchor in FlexOlmo,
  so averaging them changes nothing, but a pool whose shared tensors moved gets the true soup).
  Routers and biases have no dense counterpart and are dropped. By default the pool is the public
  model plus every owner, the same n + 1 "domain models" the merged FlexOlmo holds as experts
  (and every owner's model itself always mixes the public FFN with its own: top-2 of 2);
  ``include_public=False`` averages the owners' FFNs only.

BTM (:class:`BTMScorer`, :func:`btm_scorer`)
  Branch-Train-Merge (Li et al. 2022) ensembles the domain models' output *distributions* with
  weights from Bayes' rule on the context: ``w_m(t) ∝ prior_m * p_m(x_<t)``. We use the whole
  preceding part of the token's own segment (document piece) as the context, so a token's weights
  use only tokens before it, never itself or anything after (causal, no peeking), and the first
  token of a segment uses the prior. Mixing is ``log sum_m w_m(t) p_m(x_t | x_<t)`` with
  logsumexp in log space. With the full prefix this is exactly the Bayesian model average: a
  segment's summed log-likelihood equals ``log sum_m prior_m p_m(segment)`` (tested).
  ``top_k`` keeps only each token's k heaviest members (FlexOlmo's "BTM top-2" baseline; ties at
  the k-th weight are kept, so the first token, with equal prior weights, uses every member).
  Members are, by default, the public anchor plus each owner's 2-expert model.

Perplexity and bits per byte (:func:`evaluate`)
  Every token of each domain's evaluation sample (:mod:`flexmoe_jax.evaluation.sample`: whole
  documents drawn with a fixed seed across the split, or the whole split), each scored with the
  context of its own document piece. ``nll`` is the mean NLL per token (nats), ``ppl = exp(nll)``,
  ``bpb = summed NLL / ln 2 / UTF-8 bytes of the sampled documents`` (tokenizer-independent), with a
  95% bootstrap interval over documents (:mod:`flexmoe_jax.evaluation.bootstrap`).

Multiple choice (:func:`mc_items`, :func:`score_mc`)
  As lm-eval-harness does multiple choice, from held-out text of each domain: the context is a
  document's first line(s) (at least ``MC_MIN_CONTEXT`` characters), the true continuation is its
  next non-blank line; a document with no such split is cut inside its first line, between
  sentences, else between clauses (after ":" or ";", as in a dictionary entry "word (pos): gloss").
  The distractors are K-1 units of the same kind (lines, sentences, clauses) from *other* documents of the
  same source and split, distinct from the truth, from each other and from every unit of the
  item's own document, and matched in length: drawn at random from the ``MC_LENGTH_POOL x
  (K-1)`` candidates closest in characters to the truth (summed log-likelihood favours short
  strings; with free-length distractors every model "chooses" the shortest dictionary gloss).
  Documents with no usable split, or too few distinct distractors, are skipped. Item choice, distractors and the truth's
  position are seeded, so the suite is the same
  for every model. Each choice is scored by its summed log-likelihood given the context
  (``mc_acc``) and by that divided by its UTF-8 length (``mc_acc_norm``, lm-eval's acc_norm).
  Pieces are encoded as lm-eval's ``_encode_pair`` does (whole text, context prefix split off).

Results are plain JSON: ``{domain: {"bpb", "ppl", "nll", "tokens", "bytes", "docs", "mc_acc",
"mc_acc_norm", "mc_items", "mc_choices", "seq_len"}}`` plus ``"average"`` over the closed domains
(macro means of bpb, nll, mc accuracies; ppl = exp(mean nll); tokens summed).
:func:`results_table` and :func:`plot` render a ``{model name: results}`` map;
:func:`main_eval` is what ``flexmoe eval`` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model, routing as routing_lib, selection, storage
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation import bootstrap, sample as sample_lib

Batch = dict[str, Any]

# The sequence length every phase in gin_configs/ trains at: evaluating longer would measure RoPE
# extrapolation rather than the model. Capped at the model's max_seq_len.
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 16
DEFAULT_MC_ITEMS = 100
DEFAULT_MC_CHOICES = 4
PUBLIC = "public"
AVERAGE = "average"
REPLICATES = "_bpb_replicates"
PER_DOC = ("doc_nll", "doc_bytes", "doc_source")  # per-document keys, kept out of results.json

# Multiple-choice item limits (characters). Short enough that context + choice fit the default
# seq_len with any reasonable tokenizer; longer ones are left-truncated as lm-eval does.
MC_MIN_CONTEXT = 20
MC_MAX_CONTEXT = 400
MC_MIN_CHOICE = 8
MC_MAX_CHOICE = 160
MC_LENGTH_POOL = 5  # distractors come from the (choices - 1) x this candidates closest in length to the truth


# ----------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------

class Scorer:
    """Log-probabilities of next tokens for packed rows; every model kind evaluates through this.

    ``logprobs(batch)`` takes the seqio decoder features (``decoder_input_tokens``,
    ``decoder_target_tokens``, ``decoder_positions``, ``decoder_segment_ids``, int32 [B, S]) and
    returns float32 [B, S]: ``log p(target_t | inputs of t's segment up to t)``, 0 where
    ``decoder_segment_ids == 0`` (padding). Rows are independent; segments of a row never see
    each other. Subclasses set ``name``, ``vocab_size`` and ``max_seq_len``.
    """

    name: str = "model"
    vocab_size: int = 0
    max_seq_len: int = 0

    def logprobs(self, batch: Batch) -> jax.Array:
        raise NotImplementedError

    def token_logprobs(self, batch: Batch) -> np.ndarray:
        """:meth:`logprobs` as a host numpy array."""
        return np.asarray(jax.device_get(self.logprobs(batch)), np.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _model_logprobs(config: ModelConfig, params, inputs, targets, positions, segment_ids, route_bias=None):
    logits, _ = model.apply(config, params, inputs, positions, segment_ids, route_bias=route_bias)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.where(segment_ids > 0, target_logit - lse, 0.0)


def _device_batch(batch: Batch) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(batch[k], jnp.int32) for k in
                 ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions", "decoder_segment_ids"))


class ModelScorer(Scorer):
    """One (config, params) model: dense, MoE, optionally with only ``active_experts`` kept.

    Opt-out slices the expert axis once here (:mod:`flexmoe_jax.selection`: routing then softmaxes
    over the kept experts only, top-k capped), so every batch runs the smaller model.
    ``routing`` (:data:`flexmoe_jax.routing.MODES`; default the config's own) picks the routing
    mode; ``domain`` needs ``routing_stats`` ({expert name: :class:`flexmoe_jax.routing.Stats`}) for
    the active experts (given alone, they mean ``domain``).
    """

    def __init__(self, config: ModelConfig, params: model.Params, *,
                 active_experts: Sequence[str | int] | None = None, top_k: int | None = None,
                 name: str = "model", routing: str | None = None, routing_stats: Mapping | None = None,
                 score: Mapping | None = None):
        model.check_params(config, params)
        config, params = selection.select(config, params, include=active_experts, top_k=top_k)
        config, self.router = routing_lib.resolve(config, routing, routing_stats, name, score)
        self.config, self.params, self.name = config, params, name
        self.vocab_size, self.max_seq_len = config.vocab_size, config.max_seq_len

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, include: Sequence[str | int] | None = None,
                        exclude: Sequence[str | int] | None = None, top_k: int | None = None,
                        name: str | None = None, routing: str | None = None,
                        routing_stats: Mapping | None = None, score: Mapping | None = None) -> "ModelScorer":
        """Load any model checkpoint (plain, merged, or a run directory's ``model/``) with
        ``merge.load``, which never reads an excluded expert's arrays of a merged model. ``routing``
        None is :func:`default_routing`; domain routing without ``routing_stats`` uses the ones a
        merged model carries (its kept experts')."""
        config, params = load_model(path, include=include, exclude=exclude, top_k=top_k)
        if routing_stats is None:
            routing, routing_stats = default_routing(path, config, routing)
        return cls(config, params, name=name or default_name(path, include, exclude), routing=routing,
                   routing_stats=routing_stats, score=score)

    def logprobs(self, batch: Batch) -> jax.Array:
        inputs, targets, positions, segs = _device_batch(batch)
        if inputs.shape[1] > self.max_seq_len:
            raise UserError(f"rows of {inputs.shape[1]} tokens exceed {self.name}'s max_seq_len="
                            f"{self.max_seq_len}; evaluate with a smaller seq_len")
        bias = None if self.router is None else self.router.bias(inputs, positions, segs)
        return _model_logprobs(self.config, self.params, inputs, targets, positions, segs, bias)


def _batch_key(batch: Batch) -> bytes:
    """A digest of the four decoder features: equal batches (same tokens, positions, segments) collide."""
    import hashlib

    h = hashlib.blake2b(digest_size=20)
    for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions", "decoder_segment_ids"):
        a = np.ascontiguousarray(np.asarray(batch[k], np.int32))
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


class CachedScorer(Scorer):
    """A scorer that remembers its per-token log-probs of every batch it has scored, keyed by the
    batch's contents. Why: the BTM row ensembles the public model and every owner's model, which
    the evaluation has just scored on exactly the same batches as rows of their own; sharing one
    cached scorer per model turns BTM into the (cheap) mixing step alone. The cache holds [B, S]
    float32 arrays (8 KB for a 16 x 128 batch), never logits."""

    def __init__(self, inner: Scorer, name: str | None = None):
        self.inner, self.name = inner, name or inner.name
        self.vocab_size, self.max_seq_len = inner.vocab_size, inner.max_seq_len
        self._cache: dict[bytes, jax.Array] = {}
        self.hits = 0

    def logprobs(self, batch: Batch) -> jax.Array:
        key = _batch_key(batch)
        if key in self._cache:
            self.hits += 1
        else:
            self._cache[key] = self.inner.logprobs(batch)
        return self._cache[key]


# -- model soup ---------------------------------------------------------------

def dense_view(config: ModelConfig, params: model.Params) -> tuple[ModelConfig, model.Params]:
    """A pool member as a dense model: a dense model is itself; an owner's 2-expert model
    (public, own) is its shared tensors plus its own slot-1 FFN (what its training changed)."""
    if not config.is_moe:
        return config, params
    if config.num_experts != 2 or config.names[0] != "public":
        raise UserError(f"a soup averages dense models and owners' 2-expert models (public, own); got a model "
                        f"with experts {list(config.names)}. Give each owner's own model, not a merged one")
    layers = {k: v for k, v in params["layers"].items() if k != "moe"}
    layers["mlp"] = {k: params["layers"]["moe"][k][:, 1] for k in ("gate", "up", "down")}
    dense = config.replace(num_experts=0, top_k=1, expert_names=(), expert_bias=False)
    return dense, {**params, "layers": layers}


_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "head_size", "mlp_hidden",
                "rope_theta", "rms_eps", "param_dtype")


def soup(models: Sequence[tuple[ModelConfig, model.Params]],
         weights: Sequence[float] | None = None) -> tuple[ModelConfig, model.Params]:
    """The parameter average (uniform unless ``weights``) of the dense views of ``models``.

    Returns a dense (config, params) with the first model's dense config. Averaging is in float32,
    cast back to each parameter's dtype. See the module docstring for what is averaged and why.
    """
    if not models:
        raise UserError("a soup needs at least one model")
    views = [dense_view(c, p) for c, p in models]
    base = views[0][0]
    for i, (c, _) in enumerate(views[1:], 1):
        diff = [f"{k}={getattr(c, k)} vs {getattr(base, k)}" for k in _ARCH_FIELDS if getattr(c, k) != getattr(base, k)]
        if diff:
            raise UserError(f"soup member {i} has another architecture than member 0 ({', '.join(diff)}); "
                            "only models fine-tuned from the same anchor can be averaged")
    w = np.full(len(views), 1.0 / len(views)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(views),) or not np.all(w >= 0) or not np.isclose(w.sum(), 1.0):
        raise UserError(f"soup weights must be {len(views)} non-negative numbers summing to 1, got {weights}")
    for i, (c, p) in enumerate(views):
        model.check_params(c, p, f"soup member {i}")

    def avg(*xs):
        acc = sum(float(wi) * jnp.asarray(x, jnp.float32) for wi, x in zip(w, xs))
        return acc.astype(jnp.asarray(xs[0]).dtype)

    params = jax.tree.map(avg, *[p for _, p in views])
    return base, params


# -- BTM ensemble -------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("top_k", "mean"))
def btm_combine(member_logprobs: jax.Array, segment_ids: jax.Array, log_prior: jax.Array,
                top_k: int | None = None, temperature: float = 1.0, mean: bool = False) -> jax.Array:
    """Mix M members' per-token log-probs [M, B, S] into the BTM ensemble's [B, S].

    Member m's weight at token t is ``softmax_m(log_prior_m + sum of m's log-probs of the tokens
    before t in t's segment)``: the posterior over members given the segment so far. Only earlier
    tokens of the same segment (a run of equal non-zero ``segment_ids``) enter a token's weights.
    ``mean=True, temperature=T`` is the paper's form: ``softmax_m(-NLL_m / T)`` with NLL the mean
    negative log-likelihood of the context (uniform before any context); ``top_k`` keeps the k
    heaviest members, renormalized.
    """
    valid = segment_ids > 0
    lp = jnp.where(valid[None], member_logprobs.astype(jnp.float32), 0.0)
    before = jnp.cumsum(lp, axis=-1) - lp  # sum over positions < t of the row
    s = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # first position of t's segment
    at_start = jnp.take_along_axis(before, jnp.broadcast_to(seg_start[None], before.shape), axis=-1)
    context = before - at_start  # [M, B, S] log-likelihood of the segment before t
    if mean:
        context = context / jnp.maximum(idx - seg_start, 1)[None].astype(jnp.float32)
    logw = log_prior[:, None, None] + context / temperature
    m = logw.shape[0]
    if top_k is not None and top_k < m:
        kth = jax.lax.top_k(jnp.moveaxis(logw, 0, -1), top_k)[0][..., -1]
        logw = jnp.where(logw >= kth[None], logw, -jnp.inf)
    logw = jax.nn.log_softmax(logw, axis=0)
    mixed = jax.nn.logsumexp(logw + lp, axis=0)
    return jnp.where(valid, mixed, 0.0)


class BTMScorer(Scorer):
    """Branch-Train-Merge ensemble of member scorers (see the module docstring and :func:`btm_combine`)."""

    def __init__(self, members: Sequence[Scorer], prior: Sequence[float] | None = None,
                 top_k: int | None = None, name: str = "btm", temperature: float = 1.0, mean: bool = False):
        members = list(members)
        if not members:
            raise UserError("a BTM ensemble needs at least one member")
        if len({m.vocab_size for m in members}) != 1:
            raise UserError(f"BTM members must share one vocabulary, got sizes {[m.vocab_size for m in members]}")
        p = np.full(len(members), 1.0 / len(members)) if prior is None else np.asarray(prior, np.float64)
        if p.shape != (len(members),) or not np.all(p > 0):
            raise UserError(f"the BTM prior needs {len(members)} positive numbers, got {prior}")
        if top_k is not None and not 1 <= top_k <= len(members):
            raise UserError(f"BTM top_k={top_k} must be between 1 and the {len(members)} members")
        if not temperature > 0:
            raise UserError(f"BTM temperature must be positive, got {temperature}")
        self.members, self.top_k, self.name = members, top_k, name
        self.temperature, self.mean = float(temperature), bool(mean)
        self.log_prior = jnp.asarray(np.log(p / p.sum()), jnp.float32)
        self.vocab_size = members[0].vocab_size
        self.max_seq_len = min(m.max_seq_len for m in members)

    def logprobs(self, batch: Batch) -> jax.Array:
        lps = jnp.stack([m.logprobs(batch) for m in self.members])
        segs = jnp.asarray(batch["decoder_segment_ids"], jnp.int32)
        return btm_combine(lps, segs, self.log_prior, self.top_k, self.temperature, self.mean)


# -- loading ------------------------------------------------------------------

def _model_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory's ``model/``."""
    from flexmoe_jax import checkpoint

    p = storage.resolve(path)
    if not (p / checkpoint.MARKER_NAME).is_file() and (p / "model" / checkpoint.MARKER_NAME).is_file():
        return p / "model"
    return p


def load_model(path: str | os.PathLike, *, include=None, exclude=None, top_k=None
               ) -> tuple[ModelConfig, model.Params]:
    """(config, params) of a plain or merged checkpoint or a run directory, with opt-in/opt-out."""
    from flexmoe_jax import checkpoint, expert, merge

    d = _model_dir(path)
    if d.is_dir() and checkpoint.kind(d) == expert.DELIVERABLE_KIND:
        raise UserError(f"{path} is an expert deliverable: it holds only the owner's trained slot. Evaluate "
                        "its run directory (or WORKDIR/model), or the merged model")
    return merge.load(d, include=include, exclude=exclude, top_k=top_k)


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
    from flexmoe_jax import merge

    return merge.read_routing_stats(_model_dir(path), names) or None


def default_name(path: str | os.PathLike, include=None, exclude=None) -> str:
    """A model's results name from its path (``.../humor/model`` -> ``humor``), plus its opt-in/out."""
    p = storage.resolve(path)
    name = p.parent.name if p.name in ("model", "expert") else p.name
    if exclude:
        name += "_minus_" + "_".join(str(x) for x in exclude)
    if include:
        name += "_only_" + "_".join(str(x) for x in include)
    return name


def _as_model(m: Any) -> tuple[ModelConfig, model.Params]:
    if isinstance(m, ModelScorer):
        return m.config, m.params
    if isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], ModelConfig):
        return m
    return load_model(m)


def soup_scorer(anchor: Any, experts: Sequence[Any], *, include_public: bool = True,
                weights: Sequence[float] | None = None, name: str = "soup") -> ModelScorer:
    """The soup baseline as a scorer. ``anchor`` and each expert: a checkpoint path, a run
    directory, a (config, params) tuple or a :class:`ModelScorer`; experts are owners' 2-expert models."""
    pool = ([_as_model(anchor)] if include_public else []) + [_as_model(e) for e in experts]
    config, params = soup(pool, weights)
    return ModelScorer(config, params, name=name)


def btm_scorer(anchor: Any, experts: Sequence[Any], *, include_public: bool = True,
               prior: Sequence[float] | None = None, top_k: int | None = None, name: str = "btm",
               temperature: float = 1.0, mean: bool = False) -> BTMScorer:
    """The BTM baseline as a scorer: the public anchor (unless ``include_public=False``) and each
    expert (an owner's 2-expert model, or the paper's dense expert) as members; ``top_k`` /
    ``temperature`` / ``mean`` as in :func:`btm_combine`. Arguments as in :func:`soup_scorer`."""
    pool = ([anchor] if include_public else []) + list(experts)
    members = [m if isinstance(m, Scorer) else ModelScorer(*_as_model(m), name=f"btm_member_{i}")
               for i, m in enumerate(pool)]
    return BTMScorer(members, prior=prior, top_k=top_k, name=name, temperature=temperature, mean=mean)


# ----------------------------------------------------------------------------
# Multiple choice from held-out text
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MCItem:
    """One question: choose ``choices[label]`` as the continuation of ``context``."""

    domain: str
    source: str      # the dataset config (or owner task) the document came from
    doc: int         # the document's index in its split (storage order)
    mode: str        # "line", "sentence" or "clause": what kind of unit the choices are
    context: str
    choices: tuple[str, ...]
    label: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Where a line may be cut when it has no usable line break: after a sentence end, else after a
# clause mark (a dictionary entry's "word (pos): gloss; example").
_CUTS = {"sentence": re.compile(r"(?<=[.!?])\s+(?=\S)"), "clause": re.compile(r"(?<=[:;])\s+(?=\S)")}
MODES = ("line", "sentence", "clause")


def _ok_choice(unit: str) -> bool:
    return MC_MIN_CHOICE <= len(unit.strip()) <= MC_MAX_CHOICE


def _norm(unit: str) -> str:
    return " ".join(unit.split())


def _pieces(line: str, mode: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence (or clause) of a line."""
    bounds, start = [], 0
    for m in _CUTS[mode].finditer(line):
        bounds.append((start, m.start()))
        start = m.end()
    bounds.append((start, len(line)))
    return [(a, b) for a, b in bounds if line[a:b].strip()]


def _doc_units(text: str) -> dict[str, list[str]]:
    """Every usable line, sentence and clause of a document: the distractor pools."""
    lines = [ln.rstrip() for ln in text.split("\n") if ln.strip()]
    out = {"line": [ln for ln in lines if _ok_choice(ln)]}
    for mode in ("sentence", "clause"):
        out[mode] = [u for u in (ln[a:b].strip() for ln in lines for a, b in _pieces(ln, mode)) if _ok_choice(u)]
    return out


def split_document(text: str) -> tuple[str, str, str] | None:
    """(context, true continuation, mode) of a document, or None if it has no well-posed split.

    ``line``: the shortest run of first lines with at least ``MC_MIN_CONTEXT`` characters whose
    next non-blank line is a usable choice; the context keeps its newlines (it ends with one) and
    the continuation is that line. Documents with no such split are cut inside their first line:
    ``sentence`` after a sentence end, else ``clause`` after a ":" or ";"; the context runs up to
    the cut and the continuation is " " + the next sentence (clause).
    """
    lines = text.split("\n")
    for i in range(len(lines) - 1):
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j == len(lines):
            break
        context = "\n".join(lines[:j]) + "\n"
        if len(context) > MC_MAX_CONTEXT:
            break
        if len(context.strip()) >= MC_MIN_CONTEXT and _ok_choice(lines[j]):
            return context, lines[j].rstrip(), "line"
    first = next((ln for ln in lines if ln.strip()), "")
    prefix = text[: text.index(first)] if first else ""
    for mode in ("sentence", "clause"):
        cuts = _pieces(first, mode)
        for k in range(len(cuts) - 1):
            context = prefix + first[: cuts[k][1]]
            if len(context) > MC_MAX_CONTEXT:
                break
            truth = first[cuts[k + 1][0]: cuts[k + 1][1]].strip()
            if len(context.strip()) >= MC_MIN_CONTEXT and _ok_choice(truth):
                return context, " " + truth, mode
    return None


def build_mc_items(texts: Sequence[str], domain: str, source: str, n_items: int = DEFAULT_MC_ITEMS,
                   n_choices: int = DEFAULT_MC_CHOICES, seed: int = 0) -> list[MCItem]:
    """Up to ``n_items`` well-posed items from the documents ``texts`` of one source (deterministic)."""
    if n_choices < 2:
        raise UserError(f"a multiple-choice item needs at least 2 choices, got {n_choices}")
    units = [_doc_units(t) for t in texts]
    splits = [split_document(t) for t in texts]
    eligible = [i for i, s in enumerate(splits) if s is not None]
    src = zlib.crc32(source.encode())
    if len(eligible) > n_items:
        rng = np.random.default_rng([seed, src])
        eligible = sorted(int(i) for i in rng.choice(eligible, n_items, replace=False))
    pools: dict[str, list[tuple[int, str]]] = {}
    for mode in MODES:
        seen, pool = set(), []
        for i, u in enumerate(units):
            for x in u[mode]:
                if _norm(x) not in seen:  # one copy of each distinct unit (the first document's)
                    seen.add(_norm(x))
                    pool.append((i, x))
        pools[mode] = pool
    items = []
    for i in eligible:
        context, truth, mode = splits[i]
        own = {_norm(x) for m in MODES for x in units[i][m]} | {_norm(truth)}
        cands = [x for d, x in pools[mode] if d != i and _norm(x) not in own]
        if len(cands) < n_choices - 1:
            continue
        rng = np.random.default_rng([seed, src, i])
        # Length-matched distractors: drawn from the candidates closest in length to the truth.
        # Summed log-likelihood favours short strings, so free-length distractors make the item
        # a length test (a dictionary's "toecap (noun):" beats every real definition).
        order = rng.permutation(len(cands))  # random tie-break among equal lengths
        order = sorted(order, key=lambda j: abs(len(_norm(cands[j])) - len(_norm(truth))))
        near = order[: MC_LENGTH_POOL * (n_choices - 1)]
        picked = [cands[j] for j in sorted(rng.choice(near, n_choices - 1, replace=False))]
        if mode != "line":
            picked = [" " + x.strip() for x in picked]
        label = int(rng.integers(n_choices))
        choices = picked[:label] + [truth] + picked[label:]
        items.append(MCItem(domain, source, i, mode, context, tuple(choices), label))
    return items


def mc_items(data_dir, task: str, split: str = "test", n_items: int = DEFAULT_MC_ITEMS,
             n_choices: int = DEFAULT_MC_CHOICES, seed: int = 0, max_tokens: int | None = None,
             sample_seed: int = 0) -> list[MCItem]:
    """The multiple-choice items of a task (``flexmix_mini.<d>``, ``flexmix_mini.public``, or an
    owner's task), built from the documents of its evaluation sample (``max_tokens`` / ``sample_seed``,
    :func:`flexmoe_jax.evaluation.sample.draw`; default the whole split). A mixture's items come from
    each source in turn, distractors from the same source's sampled documents.

    Cached per process (keyed on the manifests' times, so a rebuild or re-registration is seen): every
    model of a comparison is scored on the same items without re-reading the text.
    """
    d = str(Path(data_dir).resolve())
    return list(_mc_items_cached(d, sample_lib.stamp(d, task), task, split, n_items, n_choices, seed, max_tokens,
                                 sample_seed))


@functools.lru_cache(maxsize=64)
def _mc_items_cached(data_dir: str, stamp, task: str, split: str, n_items: int, n_choices: int,
                     seed: int, max_tokens: int | None, sample_seed: int) -> tuple[MCItem, ...]:
    del stamp  # part of the cache key only
    domain = short_name(task)
    texts = sample_lib.draw(data_dir, task, split, DEFAULT_SEQ_LEN, max_tokens, sample_seed).source_texts()
    per_source = [build_mc_items(t, domain, config, n_items, n_choices, seed) for config, t in texts.items()]
    out = []
    for k in range(max((len(x) for x in per_source), default=0)):  # round robin over the sources
        out += [x[k] for x in per_source if k < len(x)]
    return tuple(out[:n_items])


def _encode_pair(sp, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness's ``_encode_pair``: trailing spaces move to the continuation, the whole text is
    encoded once and the context's own encoding length splits it."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = sp.encode(context + continuation)
    ctx = sp.encode(context)
    return whole[: len(ctx)], whole[len(ctx):]


def mc_rows(items: Sequence[MCItem], sp, seq_len: int) -> tuple[Batch, np.ndarray, list[tuple[int, int]]]:
    """One packed row per (item, choice): ``[BOS=0] + context + choice`` left-truncated to fit.

    Returns the batch features, the scoring mask [R, S] (1 on the choice's targets) and the
    (item, choice) of each row.
    """
    rows, owners = [], []
    for q, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            ctx, cont = _encode_pair(sp, item.context, choice)
            if not cont:
                raise UserError(f"choice {choice!r} of item {q} encodes to no tokens")
            toks = [0] + ctx + cont
            window = toks[-(seq_len + 1):]
            rows.append((window, min(len(cont), seq_len)))
            owners.append((q, c))
    n = len(rows)
    feats = {k: np.zeros((n, seq_len), np.int32) for k in
             ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions", "decoder_segment_ids",
              "decoder_loss_weights")}
    mask = np.zeros((n, seq_len), np.float32)
    for r, (window, n_cont) in enumerate(rows):
        t = len(window) - 1
        feats["decoder_input_tokens"][r, :t] = window[:-1]
        feats["decoder_target_tokens"][r, :t] = window[1:]
        feats["decoder_positions"][r, :t] = np.arange(t)
        feats["decoder_segment_ids"][r, :t] = 1
        feats["decoder_loss_weights"][r, :t] = 1
        mask[r, t - n_cont: t] = 1.0
    return feats, mask, owners


def _batched(feats: Batch, batch_size: int) -> Iterable[tuple[int, Batch]]:
    """Fixed-shape batches (the last padded with all-zero rows) so one compiled program serves all."""
    n = len(next(iter(feats.values())))
    for lo in range(0, n, batch_size):
        chunk = {k: v[lo: lo + batch_size] for k, v in feats.items()}
        pad = batch_size - len(chunk["decoder_input_tokens"])
        if pad:
            chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        yield n - lo if pad else batch_size, chunk


def choice_loglikelihoods(scorer: Scorer, items: Sequence[MCItem], sp, seq_len: int,
                          batch_size: int = DEFAULT_BATCH_SIZE) -> list[np.ndarray]:
    """Summed log-likelihood of every choice of every item given its context (one array per item)."""
    if not items:
        return []
    feats, mask, owners = mc_rows(items, sp, seq_len)
    sums = []
    for lo, (real, chunk) in zip(range(0, len(mask), batch_size), _batched(feats, batch_size)):
        lp = scorer.token_logprobs(chunk)[:real]
        sums.append(np.sum(lp.astype(np.float64) * mask[lo: lo + real], axis=1))
    flat = np.concatenate(sums)
    out = [np.zeros(len(it.choices)) for it in items]
    for (q, c), v in zip(owners, flat):
        out[q][c] = v
    return out


def score_mc(scorer: Scorer, items: Sequence[MCItem], sp, seq_len: int,
             batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """``{"mc_acc", "mc_acc_norm", "mc_items"}``: accuracy by log-likelihood and by log-likelihood
    per UTF-8 byte of the choice (None when there are no items)."""
    lls = choice_loglikelihoods(scorer, items, sp, seq_len, batch_size)
    if not items:
        return {"mc_acc": None, "mc_acc_norm": None, "mc_items": 0}
    acc = [int(np.argmax(ll)) == it.label for ll, it in zip(lls, items)]
    norm = [int(np.argmax(ll / np.array([len(c.encode("utf-8")) for c in it.choices]))) == it.label
            for ll, it in zip(lls, items)]
    return {"mc_acc": float(np.mean(acc)), "mc_acc_norm": float(np.mean(norm)), "mc_items": len(items)}


# ----------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------

def short_name(task: str) -> str:
    """``flexmix_mini.humor`` -> ``humor``; ``flexmix_mini.public`` -> ``public``; others unchanged."""
    from flexmoe_jax.data import layout as L

    return task[len(L.TASK_PREFIX):] if task.startswith(L.TASK_PREFIX) else task


def default_tasks(data_dir) -> list[str]:
    """Every closed domain built in ``data_dir`` (in ``CLOSED_DOMAINS`` order), then the public mixture."""
    from flexmoe_jax import data

    known = set(data.register_tasks(data_dir))
    out = [f"{data.TASK_PREFIX}{d}" for d in data.CLOSED_DOMAINS if f"{data.TASK_PREFIX}{d}" in known]
    if data.PUBLIC_MIXTURE in known:
        out.append(data.PUBLIC_MIXTURE)
    return out


def resolve_tasks(data_dir, tasks: Sequence[str] | None) -> list[str]:
    """Task names from short domain names (``humor``, ``public``), full names, or owners' task names."""
    from flexmoe_jax import data

    if tasks is None:
        out = default_tasks(data_dir)
        if not out:
            raise UserError(f"no FlexMix-mini tasks in {data_dir}: run `flexmoe data build` first")
        return out
    known = data.register_tasks(data_dir)
    out = []
    for t in tasks:
        full = data.PUBLIC_MIXTURE if t == PUBLIC else t if t in known else f"{data.TASK_PREFIX}{t}"
        if full not in known or full == data.ALL_MIXTURE:
            usable = sorted(short_name(k) for k in known if k != data.ALL_MIXTURE and k not in
                            [f"{data.TASK_PREFIX}{s}" for s in data.PUBLIC_SOURCES])
            raise UserError(f"unknown task {t!r} in {data_dir}; known: {', '.join(usable)}")
        if full not in out:
            out.append(full)
    return out


def perplexity(scorer: Scorer, task: str, data_dir, split: str = "test", seq_len: int = DEFAULT_SEQ_LEN,
               batch_size: int = DEFAULT_BATCH_SIZE, progress: Callable[[], None] | None = None,
               max_tokens: int | None = None, sample_seed: int = 0) -> dict:
    """Bits per byte, perplexity and NLL of a task's evaluation sample (:mod:`flexmoe_jax.evaluation.sample`:
    whole documents drawn with ``sample_seed`` up to ``max_tokens`` tokens; default the whole split).

    Returns ``{"nll", "ppl", "bpb", "bpb_ci", "tokens", "bytes", "docs", "sample", "doc_nll", "doc_bytes",
    "doc_source"}`` plus the bootstrap replicates under :data:`REPLICATES` (a numpy array, dropped by
    :func:`evaluate`): ``bpb_ci`` the 95% bootstrap interval over documents, ``sample`` its size and what
    it was drawn from, ``doc_*`` per sampled document (summed NLL in nats, bytes, source number), what
    paired comparisons between models need (:class:`flexmoe_jax.evaluation.bootstrap.Paired`).
    """
    s = sample_lib.draw(data_dir, task, split, seq_len, max_tokens, sample_seed)
    high = int(s.rows["decoder_target_tokens"].max(initial=0))
    if high >= scorer.vocab_size:
        raise UserError(f"{task} has token id {high} but {scorer.name}'s vocabulary has {scorer.vocab_size} "
                        "entries: evaluate with the data directory (tokenizer) the model was trained with")
    doc_nll = sample_lib.score_docs(scorer.token_logprobs, s, batch_size, progress)
    tokens, n_bytes = int(s.doc_tokens.sum()), int(s.doc_bytes.sum())
    if tokens == 0:
        raise UserError(f"{task} split {split!r} has no tokens")
    nll = float(doc_nll.sum()) / tokens
    reps = bootstrap.bpb_replicates(doc_nll, s.doc_bytes, bootstrap.indices(s.doc_source, seed=short_name(task)))
    return {"nll": nll, "ppl": math.exp(nll), "bpb": float(doc_nll.sum()) / math.log(2) / n_bytes,
            "bpb_ci": bootstrap.interval(reps), "tokens": tokens, "bytes": n_bytes, "docs": s.num_docs,
            "sample": s.size(), "doc_nll": [float(x) for x in doc_nll],
            "doc_bytes": [int(x) for x in s.doc_bytes], "doc_source": [int(x) for x in s.doc_source],
            REPLICATES: reps}


def evaluate(scorer: Scorer, data_dir, tasks: Sequence[str] | None = None, split: str = "test",
             seq_len: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             mc_items_per_domain: int = DEFAULT_MC_ITEMS, mc_choices: int = DEFAULT_MC_CHOICES,
             seed: int = 0, progress: bool = True, max_tokens: int | None = None, sample_seed: int = 0) -> dict:
    """Per-domain perplexity / bits per byte and multiple-choice accuracy of one scorer.

    ``tasks``: domain names (``humor``, ``public``) or task names; default every closed domain
    built in ``data_dir`` plus ``public``. ``seq_len`` default: :data:`DEFAULT_SEQ_LEN` capped at
    the model's ``max_seq_len``. ``max_tokens`` / ``sample_seed``: each domain's evaluation sample
    (see :func:`perplexity`; the multiple-choice items come from the same documents).
    ``mc_items_per_domain=0`` skips the multiple-choice suite.
    Returns ``{domain: metrics, ..., "average": metrics over the closed domains}`` (JSON-ready).
    """
    from tqdm.auto import tqdm

    from flexmoe_jax import data

    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, scorer.max_seq_len)
    if seq_len <= 1 or seq_len > scorer.max_seq_len:
        raise UserError(f"seq_len={seq_len} must be in [2, {scorer.max_seq_len}] ({scorer.name}'s max_seq_len)")
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    task_names = resolve_tasks(data_dir, tasks)
    sp = data.sentencepiece(data_dir)
    if sp.get_piece_size() > scorer.vocab_size:
        raise UserError(f"the tokenizer of {data_dir} has {sp.get_piece_size()} pieces but {scorer.name}'s "
                        f"vocabulary has {scorer.vocab_size}: evaluate with the data directory the model was "
                        "trained with")
    results: dict[str, dict] = {}
    bar = tqdm(desc=f"eval {scorer.name}", unit="batch", disable=not progress, leave=False)
    try:
        for task in task_names:
            dom = short_name(task)
            bar.set_postfix_str(dom)
            r = perplexity(scorer, task, data_dir, split, seq_len, batch_size, progress=bar.update,
                           max_tokens=max_tokens, sample_seed=sample_seed)
            if mc_items_per_domain > 0:
                items = mc_items(data_dir, task, split, mc_items_per_domain, mc_choices, seed, max_tokens, sample_seed)
                r.update(score_mc(scorer, items, sp, seq_len, batch_size))
                r["mc_choices"] = mc_choices
            r["seq_len"] = seq_len
            results[dom] = r
    finally:
        bar.close()
    reps = {d: r.pop(REPLICATES) for d, r in results.items()}
    avg = average(results)
    if avg is not None:
        avg["bpb_ci"] = bootstrap.interval(np.mean([reps[d] for d in avg["domains"]], axis=0))
        results[AVERAGE] = avg
    return results


def average(results: Mapping[str, dict]) -> dict | None:
    """Macro average over the closed domains present (None if there are none): mean bpb, nll and
    MC accuracies (over domains that have items), ppl = exp(mean nll), tokens and items summed."""
    from flexmoe_jax.data import CLOSED_DOMAINS

    doms = [d for d in CLOSED_DOMAINS if d in results]
    if not doms:
        return None
    rs = [results[d] for d in doms]
    out = {"domains": doms, "bpb": float(np.mean([r["bpb"] for r in rs])),
           "nll": float(np.mean([r["nll"] for r in rs])), "tokens": int(sum(r["tokens"] for r in rs))}
    out["ppl"] = math.exp(out["nll"])
    for k in ("mc_acc", "mc_acc_norm"):
        vals = [r[k] for r in rs if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["mc_items"] = int(sum(r.get("mc_items", 0) for r in rs))
    return out


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


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------

def _columns(results: Mapping[str, Mapping[str, dict]]) -> list[str]:
    from flexmoe_jax.data import CLOSED_DOMAINS

    seen = []
    for per in results.values():
        for d in per:
            if d not in seen:
                seen.append(d)
    order = [d for d in CLOSED_DOMAINS if d in seen] + [d for d in seen if d not in CLOSED_DOMAINS
                                                         and d not in (PUBLIC, AVERAGE)]
    return order + [d for d in (PUBLIC, AVERAGE) if d in seen]


def results_table(results: Mapping[str, Mapping[str, dict]]) -> str:
    """Markdown: one table of bits per byte and one of MC accuracy; rows models, columns domains +
    average; the best value of each column in bold."""
    cols = _columns(results)
    out = []
    for key, title, better in (("bpb", "bits per byte (lower is better)", min),
                               ("mc_acc", "multiple-choice accuracy (higher is better)", max),
                               ("mc_acc_norm", "multiple-choice accuracy, length-normalized (higher is better)", max)):
        vals = {m: {d: per.get(d, {}).get(key) for d in cols} for m, per in results.items()}
        if not any(v is not None for row in vals.values() for v in row.values()):
            continue
        best = {d: better([row[d] for row in vals.values() if row[d] is not None], default=None) for d in cols}
        fmt = "{:.4f}" if key == "bpb" else "{:.3f}"
        out.append(f"### {title}\n")
        out.append("| model | " + " | ".join(cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for m, row in vals.items():
            cells = []
            for d in cols:
                v = row[d]
                s = "–" if v is None else fmt.format(v)
                cells.append(f"**{s}**" if v is not None and v == best[d] and len(vals) > 1 else s)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(results: Mapping[str, Mapping[str, dict]], path: str | os.PathLike, relative_to: str | None = None) -> Path:
    """A PNG of per-domain bits per byte per model (grouped bars), plus MC accuracy if measured (with
    binomial standard-error bars: a handful of items per domain is noise, and the bars say so).
    ``relative_to``: plot each model's relative bpb change against that model instead (a 5% difference
    is then visible); that model itself is left out."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not results:
        raise UserError("no results to plot")
    cols = _columns(results)
    base = results.get(relative_to) if relative_to is not None else None
    if relative_to is not None and base is None:
        raise UserError(f"cannot plot relative to {relative_to!r}: it is not among the results {list(results)}")
    models = [m for m in results if m != relative_to]
    panels = [("bpb", "bits per byte (lower is better)" if base is None else
               f"bits per byte, relative change vs {relative_to} (lower is better)")]
    if any(per.get(d, {}).get("mc_acc") is not None for per in results.values() for d in cols):
        panels.append(("mc_acc", "multiple-choice accuracy"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.2 * len(cols) * max(1, len(models)) ** 0.5 + 2),
                                                      3.6 * len(panels)), squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(cols))
    colors = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")  # one distinct color per model
    for ax, (key, title) in zip(axes[:, 0], panels):
        for i, m in enumerate(models):
            vals = [results[m].get(d, {}).get(key) for d in cols]
            if key == "bpb" and base is not None:
                vals = [None if v is None or d not in base else v / base[d]["bpb"] - 1 for v, d in zip(vals, cols)]
            err = None
            if key == "mc_acc":  # binomial standard error over the domain's items
                n = [results[m].get(d, {}).get("mc_items") or 0 for d in cols]
                err = [np.sqrt(v * (1 - v) / k) if v is not None and k else np.nan for v, k in zip(vals, n)]
            ax.bar(x + (i - (len(models) - 1) / 2) * width, [np.nan if v is None else v for v in vals], width,
                   label=m, color=colors(i % colors.N), yerr=err, capsize=2 if err else 0)
        if key == "bpb" and base is not None:
            ax.axhline(0, color="k", lw=0.8)
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_xticks(x, cols)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    # Outside the axes, so no bar is hidden behind it.
    axes[0, 0].legend(fontsize="small", ncol=max(1, len(models) // 12 + 1), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = storage.resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(path):  # one object write: published whole
        with path.open("wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")  # keep the legend outside the axes in the image
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_json_atomic(path: Path, obj: Any) -> None:
    storage.write_json(path, obj, sort_keys=False)


def docs_path(json_out: str | os.PathLike) -> Path:
    """Where :func:`main_eval` keeps the per-document scores beside ``json_out`` (``x.json`` -> ``x.docs.json``)."""
    p = storage.resolve(json_out)
    return p.with_name(p.stem + ".docs.json")


def strip_per_doc(results: Mapping[str, dict]) -> dict:
    """A model's results without the per-document lists (:data:`PER_DOC`)."""
    return {d: {k: v for k, v in r.items() if k not in PER_DOC} for d, r in results.items()}


def main_eval(models: Any, data_dir, *, names: Sequence[str] | None = None,
              include: Sequence[str | int] | None = None, exclude: Sequence[str | int] | None = None,
              top_k: int | None = None, tasks: Sequence[str] | None = None, split: str = "test",
              seq_len: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
              mc_items_per_domain: int = DEFAULT_MC_ITEMS, mc_choices: int = DEFAULT_MC_CHOICES,
              json_out: str | os.PathLike | None = None, table_out: str | os.PathLike | None = None,
              plot_out: str | os.PathLike | None = None, update: bool = True, progress: bool = True,
              log: Callable[[str], None] | None = print, max_tokens: int | None = None,
              sample_seed: int = 0, routing: str | None = None,
              routing_stats: Mapping | None = None, score: Mapping | None = None) -> dict[str, dict]:
    """What ``flexmoe eval`` runs: evaluate models, write JSON / markdown / PNG, print the table.

    ``models``: one checkpoint path (plain or merged checkpoint, or a run directory), a list of
    them, or a ``{name: path | Scorer | (config, params)}`` map (baselines from
    :func:`soup_scorer` / :func:`btm_scorer` go in here). ``include`` / ``exclude`` / ``top_k``
    apply to every path (opt-in/opt-out at load, ``merge.load``); ``names`` name the paths
    (default :func:`default_name`, e.g. ``merged_minus_code``). With ``update`` an existing
    ``json_out`` keeps its other models' results (the demo adds models one call at a time);
    the table and plot then show every model in the file. ``max_tokens`` / ``sample_seed``: each
    domain's evaluation sample (:func:`perplexity`). ``routing`` / ``routing_stats`` / ``score``: the
    routing mode and router scores of every model loaded here (:class:`ModelScorer`). The per-document scores stay out
    of ``json_out``;
    they go to :func:`docs_path` of it (what paired bootstrap comparisons read). Returns
    ``{name: results}`` of this call, per-document scores included.
    """
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if isinstance(models, Mapping):
        if names is not None:
            raise UserError("names= is for a list of checkpoint paths; a map already names its models")
        entries = list(models.items())
    else:
        models = list(models)
        if names is not None and len(names) != len(models):
            raise UserError(f"{len(names)} names for {len(models)} checkpoints")
        entries = [(names[i] if names else default_name(p, include, exclude), p) for i, p in enumerate(models)]
    if len({n for n, _ in entries}) != len(entries):
        raise UserError(f"two models share a name: {[n for n, _ in entries]}; give names=")
    if not entries:
        raise UserError("no models to evaluate")
    prior: dict = {}
    if json_out is not None and update and storage.resolve(json_out).exists():
        try:
            prior = json.loads(storage.resolve(json_out).read_text())
        except ValueError as e:
            raise UserError(f"{json_out} is not a results JSON file ({e}); remove it or pass another --json") from None
        if not isinstance(prior, dict):
            raise UserError(f"{json_out} does not hold a {{model: results}} map; remove it or pass another --json")
    task_names = resolve_tasks(data_dir, tasks)  # fail on a bad task before loading any model
    new: dict[str, dict] = {}
    for name, m in entries:
        if isinstance(m, Scorer):
            scorer = m
        elif isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], ModelConfig):
            scorer = ModelScorer(*selection.select(*m, include, exclude, top_k), name=name, routing=routing,
                                 routing_stats=routing_stats, score=score)
        else:
            scorer = ModelScorer.from_checkpoint(m, include=include, exclude=exclude, top_k=top_k, name=name,
                                                 routing=routing, routing_stats=routing_stats, score=score)
        new[name] = evaluate(scorer, data_dir, task_names, split, seq_len, batch_size, mc_items_per_domain,
                             mc_choices, progress=progress, max_tokens=max_tokens, sample_seed=sample_seed)
    everything = {**prior, **{n: strip_per_doc(r) for n, r in new.items()}}
    if json_out is not None:
        docs_file = docs_path(json_out)
        docs = json.loads(docs_file.read_text()) if update and docs_file.exists() else {}
        for n, r in new.items():
            docs[n] = {d: {k: v[k] for k in PER_DOC} for d, v in r.items() if "doc_nll" in v}
        _write_json_atomic(docs_file, docs)
        _write_json_atomic(storage.resolve(json_out), everything)
    table = results_table(everything)
    if table_out is not None:
        storage.resolve(table_out).parent.mkdir(parents=True, exist_ok=True)
        storage.write_text(storage.resolve(table_out), table + "\n")
    if plot_out is not None:
        plot(everything, plot_out)
    if log is not None:
        log(table)
    return new


