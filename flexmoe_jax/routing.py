"""Routing modes: which experts each token of a merged model uses.

``top_k`` (the reference), ``public_plus``, ``document_top_k`` / ``document_public_plus`` (router
logits averaged over the document so far) are ``ModelConfig.routing`` values; ``domain`` routes each
token to {public, d} where d is the expert whose smoothed bigram model of its own data (:class:`Stats`)
best explains the document so far, or to the public expert alone. Opting an expert out removes its
stats and nothing else. Why it composes: docs/routing.md.

What a :class:`Stats` discloses: :func:`fit` counts exactly, and an exact pair table is a membership
oracle for every string in the data (docs/privacy.md, measured). What owners publish is the
differentially private release of :mod:`flexmoe_jax.private_stats` (noisy unigram counts and a hashed
pair sketch, with (epsilon, delta) per document in ``Stats.release``); exact stats only on request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import storage
from flexmoe_jax.config import ROUTINGS, ModelConfig
from flexmoe_jax.errors import UserError

MODES = (*ROUTINGS, "domain")
STATS_FILE = "routing_stats.npz"  # what `flexmoe train-expert` writes next to its expert
PUBLIC = "public"
ALPHA = 0.5  # add-half (Jeffreys) smoothing of the unigram counts
MU = 10.0  # Dirichlet prior strength of the bigram model on its unigram model (fixed, not tuned)
HASH_BITS = 20  # exact pair counts are hashed into 2^20 buckets per expert on the device
THRESHOLD = 3.0  # a released entry counts when above this many noise stds (pure noise passes 0.13% of the time)
_OFF = -1e9  # router-logit bias of an expert a token may not use: softmax weight exactly 0


@dataclasses.dataclass(frozen=True)
class Stats:
    """Token statistics of one expert's data: ``counts[v]``, how often token id ``v`` occurs (EOS
    included, padding not); exact integers, or a private release's noisy sums (:func:`denoised`).
    ``source``: what was counted (JSON-ready). ``release``: None for exact counts, else how they were
    released (:mod:`flexmoe_jax.private_stats`: mechanism, epsilon, delta, unit, noise)."""

    name: str
    counts: np.ndarray
    source: dict
    # Exact bigram counts (optional): sorted pair ids ``prev * V + cur`` of consecutive tokens, their counts.
    pairs: np.ndarray | None = None
    pair_counts: np.ndarray | None = None
    # A private release's bigram sketch: [2^k] noisy pair counts, pair (prev, cur) in _pair_hash's bucket.
    sketch: np.ndarray | None = None
    release: dict | None = None

    @property
    def exact(self) -> bool:
        """True when these are exact counts (they disclose the data's strings: docs/privacy.md)."""
        return self.release is None

    @property
    def tokens(self) -> float:
        """Tokens counted (exact stats) or their noisy estimate (a release)."""
        return int(self.counts.sum()) if self.exact else float(self.counts.sum())

    def save(self, path: str | os.PathLike):
        """Write ``path`` (a ``.npz``, local or ``gs://``) through the storage layer: locally atomic (a
        crash leaves the previous file or none), on object storage one upload. Returns the path."""
        buf = io.BytesIO()
        extra = {} if self.pairs is None else {"pairs": self.pairs.astype(np.int64),
                                               "pair_counts": self.pair_counts.astype(np.int64)}
        if self.sketch is not None:
            extra["sketch"] = self.sketch.astype(np.float32)
        meta = {"name": self.name, "source": self.source, "release": self.release}
        np.savez(buf, counts=self.counts.astype(np.int64 if self.exact else np.float32),
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **extra)
        return storage.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Stats":
        try:
            with np.load(io.BytesIO(storage.resolve(path).read_bytes())) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                counts = z["counts"]
                pairs = z["pairs"] if "pairs" in z.files else None
                pair_counts = z["pair_counts"] if "pair_counts" in z.files else None
                sketch = z["sketch"] if "sketch" in z.files else None
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{path} is not a routing-stats file ({e}); write one with `flexmoe routing-stats`") from e
        if counts.ndim != 1 or (meta.get("release") is None and (counts < 0).any()):
            raise UserError(f"{path}: counts must be a non-negative vector, got shape {counts.shape}")
        release = meta.get("release")
        if sketch is not None and (release is None or sketch.ndim != 1 or sketch.size & (sketch.size - 1)):
            raise UserError(f"{path}: a bigram sketch needs its release record and a power-of-two size, "
                            f"got {sketch.shape}; rewrite it with `flexmoe routing-stats`")
        return cls(meta["name"], counts, meta["source"], pairs, pair_counts, sketch, release)


class Counted(NamedTuple):
    """The tokens of a split as the model reads them: per target token its id, the token before it
    (0: none, a segment start) and its document; ``source``: what was counted (JSON-ready)."""

    ids: np.ndarray
    prev: np.ndarray
    doc: np.ndarray
    num_docs: int
    vocab_size: int
    source: dict


def count(data_dir: str | os.PathLike, task: str, split: str = "train", seq_len: int = 128,
          max_tokens: int | None = None, vocab_size: int | None = None) -> Counted:
    """The tokens of ``task``'s ``split`` in ``data_dir`` (every document, or a seeded sample of about
    ``max_tokens``), packed like training, EOS included. ``vocab_size``: default the data directory's
    tokenizer's."""
    from flexmoe_jax import data
    from flexmoe_jax.data import eval_sample as sample_lib

    if vocab_size is None:
        vocab_size = data.vocabulary(data_dir).vocab_size

    s = sample_lib.draw(data_dir, task, split, seq_len, max_tokens, 0)
    real = s.rows["decoder_loss_weights"] > 0
    ids = s.rows["decoder_target_tokens"][real]
    prev = s.rows["decoder_input_tokens"][real]
    doc = s.doc_of[real]
    if ids.size == 0:
        raise UserError(f"{task} split {split!r} in {data_dir} has no tokens to count")
    if int(ids.max()) >= vocab_size:
        raise UserError(f"{task} has token id {int(ids.max())} but the model's vocabulary has {vocab_size} "
                        "entries: count with the data directory (tokenizer) the model was trained with")
    card = Path(data_dir) / "card.json"
    source = {"task": task, "split": split, "vocab_size": vocab_size,
              "data_card_sha256": hashlib.sha256(card.read_bytes()).hexdigest() if card.is_file() else None}
    return Counted(ids, prev, doc, s.num_docs, vocab_size, source)


def fit(data_dir: str | os.PathLike, task: str, name: str, split: str = "train", seq_len: int = 128,
        max_tokens: int | None = None, vocab_size: int | None = None) -> Stats:
    """The **exact** unigram and pair counts of :func:`count`'s tokens. They disclose the data (a pair
    table answers membership of any string in it): publish :func:`flexmoe_jax.private_stats.fit`'s
    release instead; exact counts are for public data and for audits."""
    c = count(data_dir, task, split, seq_len, max_tokens, vocab_size)
    ids, prev, V = c.ids, c.prev, c.vocab_size
    pairs, pair_counts = np.unique(prev[prev > 0].astype(np.int64) * V + ids[prev > 0], return_counts=True)
    source = {**c.source, "documents": c.num_docs, "tokens": int(ids.size)}
    return Stats(name, np.bincount(ids, minlength=V).astype(np.int64), source, pairs, pair_counts.astype(np.int64))


def smoothing(stats: Stats) -> tuple[float, float]:
    """(unigram add-alpha, bigram Dirichlet mu) of an expert's models, in its counts' units: exact counts
    ALPHA and MU tokens; a private release one noise std for alpha (the guess for an entry known only to
    be below the threshold) and THRESHOLD noise stds for mu (the prior weighs as one just-kept pair)."""
    if stats.exact:
        return ALPHA, MU
    s = float(stats.release["noise_std"])
    return s, THRESHOLD * s


def denoised(stats: Stats) -> tuple[np.ndarray, np.ndarray | None]:
    """(unigram counts, pair sketch or None) as the router reads them: exact counts as they are; a
    release's entries below THRESHOLD noise stds set to 0 (post-processing: no privacy cost)."""
    if stats.exact:
        return stats.counts, None
    cut = THRESHOLD * float(stats.release["noise_std"])
    keep = lambda x: np.where(x > cut, x, 0.0).astype(np.float32)  # noqa: E731
    return keep(stats.counts), None if stats.sketch is None else keep(stats.sketch)


def log_probs(stats: Mapping[str, Stats], names: Sequence[str], vocab_size: int,
              alpha: float | None = None) -> np.ndarray:
    """[E, V] float32: each named expert's smoothed unigram log-probabilities, in ``names`` order, over
    the model's ``vocab_size`` ids (ids past a tokenizer's own vocabulary were counted 0 times).
    ``alpha`` None: each expert's :func:`smoothing`."""
    missing = [n for n in names if n not in stats]
    if missing:
        raise UserError(f"domain routing needs routing stats for every active expert; missing {missing} "
                        f"(have {sorted(stats)}): write them with `flexmoe routing-stats`")
    sizes = {n: stats[n].counts.shape[0] for n in names}
    if len(set(sizes.values())) != 1 or max(sizes.values()) > vocab_size:
        raise UserError(f"routing stats were counted with different vocabularies {sizes} or one larger than "
                        f"the model's {vocab_size}: count every expert's data with the anchor's tokenizer")
    c = np.zeros((len(names), vocab_size))
    c[:, : max(sizes.values())] = np.stack([denoised(stats[n])[0] for n in names])
    c += np.array([[smoothing(stats[n])[0] if alpha is None else alpha] for n in names])
    return np.log(c / c.sum(axis=1, keepdims=True)).astype(np.float32)


class Tables(NamedTuple):
    """A domain router's models on the device: ``uni`` [E, V] smoothed unigram log-probs; with bigrams
    also ``counts`` [E, V] unigram counts, ``bigrams`` [E, 2^k] hashed pair counts and ``mu`` [E] each
    expert's Dirichlet prior strength."""

    uni: jax.Array
    counts: jax.Array | None = None
    bigrams: jax.Array | None = None
    mu: jax.Array | None = None


def _pair_hash(prev, cur, vocab_size: int, xp=jnp, bits: int = HASH_BITS):
    """Bucket (of ``2^bits``) of the pair (prev, cur), the same in numpy (``xp=np``) and on the device."""
    if xp is np:
        ids = (prev.astype(np.uint64) * vocab_size + cur.astype(np.uint64)) & 0xFFFFFFFF
        return (((ids * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - bits)).astype(np.int64)
    ids = prev.astype(jnp.uint32) * jnp.uint32(vocab_size) + cur.astype(jnp.uint32)  # wraps mod 2^32
    return ((ids * jnp.uint32(0x9E3779B1)) >> (32 - bits)).astype(jnp.int32)


def token_ll(tables: Tables, prev: jax.Array, cur: jax.Array) -> jax.Array:
    """[..., E] each expert's log-probability of token ``cur`` after ``prev`` (0: none, the unigram model).
    Bigrams: ``(c(prev, cur) + mu p(cur)) / (c(prev) + mu)``, Dirichlet-smoothed on the unigram model."""
    uni = tables.uni.T[cur]
    if tables.bigrams is None:
        return uni
    bits = tables.bigrams.shape[1].bit_length() - 1
    c = jnp.take(tables.bigrams, _pair_hash(prev, cur, tables.uni.shape[1], bits=bits), axis=1)  # [E, ...]
    bi = jnp.log(jnp.moveaxis(c, 0, -1) + tables.mu * jnp.exp(uni)) - jnp.log(tables.counts.T[prev] + tables.mu)
    return jnp.where((prev > 0)[..., None], bi, uni)


def domain_of(tables: Tables, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, S] int32: the expert whose model (:class:`Tables`) best explains each token's segment so far
    (``inputs`` [B, S]; ``positions`` restart at 0 with each segment; padding and the BOS id 0 count
    for nothing)."""
    from flexmoe_jax.moe import segment_cumsum

    prev = jnp.where(positions > 0, jnp.pad(inputs, ((0, 0), (1, 0)))[:, :-1], 0)
    ll = jnp.where((inputs > 0)[..., None], token_ll(tables, prev, inputs), 0.0)  # [B, S, E]
    return jnp.argmax(segment_cumsum(ll, positions, segment_ids), axis=-1).astype(jnp.int32)


def allowed_bias(domain: jax.Array, num_experts: int, public: int) -> jax.Array:
    """[..., E] router-logit bias: 0 for the public expert and ``domain`` [...], -1e9 (weight exactly 0)
    for every other expert."""
    e = jnp.arange(num_experts)
    return jnp.where((e == public) | (e == domain[..., None]), 0.0, _OFF).astype(jnp.float32)


def route_bias(tables: Tables, public: int, inputs: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    """[B, S, E] router-logit bias of domain routing (:func:`allowed_bias` of :func:`domain_of`)."""
    return allowed_bias(domain_of(tables, inputs, positions, segment_ids), tables.uni.shape[0], public)


@dataclasses.dataclass(frozen=True)
class DomainRouter:
    """Domain routing for a model whose experts are ``names``: the stats table and the public slot."""

    table: Tables  # on the device once
    public: int
    names: tuple[str, ...]

    @classmethod
    def build(cls, stats: Mapping[str, Stats], names: Sequence[str], vocab_size: int) -> "DomainRouter":
        """Bigram models when every expert's stats have pairs (exact, or a private sketch) counted with
        this vocabulary, else unigram. Exact pairs are hashed into the sketches' buckets when any
        expert brings a sketch (else 2^HASH_BITS)."""
        if PUBLIC not in names:
            raise UserError(f"domain routing needs the {PUBLIC!r} expert active; this model has {list(names)}")
        uni = log_probs(stats, names, vocab_size)
        tables = Tables(jnp.asarray(uni))
        sketches = {stats[n].sketch.size for n in names if stats[n].sketch is not None}
        if len(sketches) > 1:
            raise UserError(f"routing stats of {list(names)} have pair sketches of different sizes {sorted(sketches)}: "
                            "release every expert's with the same sketch size")
        if all((stats[n].pairs is not None or stats[n].sketch is not None)
               and stats[n].source.get("vocab_size") == vocab_size for n in names):
            size = sketches.pop() if sketches else 1 << HASH_BITS
            counts = np.zeros((len(names), vocab_size), np.float32)
            bigrams = np.zeros((len(names), size), np.float32)
            for e, n in enumerate(names):
                uni_counts, sketch = denoised(stats[n])
                counts[e, : stats[n].counts.shape[0]] = uni_counts
                if sketch is not None:
                    bigrams[e] = sketch
                    continue
                prev, cur = np.divmod(stats[n].pairs, vocab_size)
                np.add.at(bigrams[e], _pair_hash(prev, cur, vocab_size, np, size.bit_length() - 1),
                          stats[n].pair_counts)
            mu = np.array([smoothing(stats[n])[1] for n in names], np.float32)
            tables = Tables(tables.uni, jnp.asarray(counts), jnp.asarray(bigrams), jnp.asarray(mu))
        return cls(tables, list(names).index(PUBLIC), tuple(names))

    @property
    def order(self) -> int:
        return 1 if self.table.bigrams is None else 2

    def bias(self, inputs, positions, segment_ids) -> jax.Array:
        return _route_bias_jit(self.table, self.public, inputs, positions, segment_ids)


_route_bias_jit = jax.jit(route_bias, static_argnums=1)


def load_stats(paths: Sequence[str | os.PathLike]) -> dict[str, Stats]:
    """Routing-stats files by expert name (one per name)."""
    out: dict[str, Stats] = {}
    for p in paths:
        s = Stats.load(p)
        if s.name in out:
            raise UserError(f"two routing-stats files for expert {s.name!r}: give one per expert")
        out[s.name] = s
    return out


def resolve(config: ModelConfig, mode: str | None = None, stats: Mapping[str, Stats] | None = None,
            what: str = "the model", score: Mapping | None = None) -> tuple[ModelConfig, DomainRouter | None]:
    """The config a model runs with under routing ``mode`` and, for ``domain``, its router.

    ``mode`` None keeps the config's own routing (or ``domain`` when ``stats`` are given); a model-side
    mode sets ``config.routing``; ``domain`` runs the trained rows top-k inside each token's allowed
    pair (:func:`route_bias`) and needs ``stats`` for every active expert. ``score``: router-score
    settings to override (``{"router_score": "cosine", "router_temperature": 0.1}``)."""
    if score:
        unknown = set(score) - {"router_score", "router_temperature"}
        if unknown:
            raise UserError(f"unknown router-score settings {sorted(unknown)}")
        if not config.is_moe:
            raise UserError(f"router-score settings need an MoE model; {what} is dense (num_experts=0)")
        config = config.replace(**score)
    if mode is None:
        mode = "domain" if stats is not None else config.routing
    if mode not in MODES:
        raise UserError(f"routing must be one of {MODES}, got {mode!r}")
    if mode != "top_k" and not config.is_moe:
        raise UserError(f"routing {mode!r} needs an MoE model; {what} is dense (num_experts=0)")
    if mode != "domain":
        if stats is not None:
            raise UserError(f"routing stats are for routing 'domain', not {mode!r}")
        return (config.replace(routing=mode) if config.is_moe else config), None
    if stats is None:
        raise UserError(f"domain routing of {what} needs routing stats for its experts {list(config.names)}: "
                        "merge with them (flexmoe merge finds each expert's routing_stats.npz) or pass "
                        "--routing_stats (flexmoe routing-stats writes them)")
    return config.replace(routing="top_k"), DomainRouter.build(stats, config.names, config.vocab_size)
