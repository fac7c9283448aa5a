"""Routing statistics an owner can publish: a differentially private release of its token counts.

Domain routing (:mod:`flexmoe_jax.routing`) needs each expert's bigram model of its own data; exact
counts are a membership oracle for every string in that data (docs/privacy.md, measured by
``flexmoe privacy audit``). :func:`fit` releases them through the Gaussian mechanism instead:

- **Domain, fixed before the data is seen**: the V unigram counts and a sketch of ``2^SKETCH_BITS``
  hashed pair buckets (``routing._pair_hash``). Every entry gets noise; no key is chosen by the data.
- **Unit = document.** Each document's vector (its unigram counts and its pairs' bucket counts) is
  scaled to L2 norm <= ``L2_CLIP``, so adding or removing one document moves the sum by at most
  ``L2_CLIP``; the sum plus N(0, (z * L2_CLIP)^2) in every entry is (epsilon, delta)-DP for the
  noise multiplier z that ``dp-accounting``'s PLD accountant calibrates (add-or-remove adjacency).
- **Released raw** (noisy sums, negative entries included): any post-processing is free under DP,
  so the reader chooses it; domain routing keeps entries above ``routing.THRESHOLD`` noise stds
  (:func:`flexmoe_jax.routing.denoised`). ``release`` records mechanism, epsilon, delta, unit, noise
  multiplier, clip, sketch size and accountant; ``source`` only what was counted (task, split,
  vocabulary), no document or token counts.

The public expert's stats go through the same mechanism (public data, so not for privacy): every
expert's model is then estimated the same way and their likelihoods stay comparable.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from flexmoe_jax import routing
from flexmoe_jax.errors import UserError

DEFAULT_EPSILON = 1.0
DEFAULT_DELTA = 1e-6
L2_CLIP = 1.0  # every document is clipped (count vectors have norm >= 1): the estimate weighs documents equally
SKETCH_BITS = 18
MECHANISM = "gaussian"
UNIT = "document"


@functools.lru_cache(maxsize=64)
def noise_multiplier(epsilon: float, delta: float = DEFAULT_DELTA) -> float:
    """The smallest Gaussian noise multiplier (std / L2 sensitivity) whose single release is
    (``epsilon``, ``delta``)-DP under add-or-remove-one-document, by dp-accounting's PLD accountant."""
    import dp_accounting
    from dp_accounting import pld

    check_budget(epsilon, delta)
    try:  # the bracket spans epsilon ~1e-2 .. ~12 at delta 1e-6; below 0.3 the PLD grid gets too large
        return float(dp_accounting.calibrate_dp_mechanism(
            pld.PLDAccountant, dp_accounting.GaussianDpEvent, float(epsilon), float(delta),
            dp_accounting.ExplicitBracketInterval(0.3, 100.0), tol=1e-3))
    except ValueError as e:
        raise UserError(f"no Gaussian noise multiplier in [0.3, 100] gives ({epsilon}, {delta})-DP ({e}): choose "
                        "an epsilon between 0.01 and 10") from None


def epsilon_of(multiplier: float, delta: float = DEFAULT_DELTA) -> float:
    """The epsilon at ``delta`` of one Gaussian release with noise ``multiplier`` (the PLD accountant)."""
    import dp_accounting
    from dp_accounting import pld

    acc = pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(float(multiplier)))
    return float(acc.get_epsilon(float(delta)))


def check_budget(epsilon, delta) -> None:
    if not (isinstance(epsilon, (int, float)) and 0 < epsilon < float("inf")):
        raise UserError(f"routing-stats epsilon must be a positive number (the privacy budget per document, "
                        f"e.g. {DEFAULT_EPSILON}), got {epsilon!r}; exact counts are --exact_routing_stats")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1e-3):
        raise UserError(f"routing-stats delta must be in (0, 1e-3) (e.g. {DEFAULT_DELTA}: well below one over "
                        f"the number of documents), got {delta!r}")


def document_sum(c: routing.Counted, bits: int | None = SKETCH_BITS) -> tuple[np.ndarray, np.ndarray]:
    """The sum over documents of each document's [unigram counts | pair-bucket counts] scaled to L2 norm
    <= ``L2_CLIP``: ([V], [2^bits]) float64 (``bits`` None: unigrams only, [V] and [0]). The exact,
    pre-noise quantity (never published)."""
    V, B = c.vocab_size, 0 if bits is None else 1 << bits
    has = (c.prev > 0) & (bits is not None)
    keys = np.concatenate([c.ids.astype(np.int64), V + routing._pair_hash(c.prev[has], c.ids[has], V, np, bits or 1)])
    docs = np.concatenate([c.doc, c.doc[has]]).astype(np.int64)
    cells, n = np.unique(docs * (V + B) + keys, return_counts=True)  # (document, entry) -> count
    doc, key = np.divmod(cells, V + B)
    norm = np.sqrt(np.bincount(doc, weights=n.astype(np.float64) ** 2, minlength=c.num_docs))
    scale = np.minimum(1.0, L2_CLIP / np.maximum(norm, 1e-12))
    total = np.bincount(key, weights=n * scale[doc], minlength=V + B)
    return total[:V], total[V:]


def release(c: routing.Counted, name: str, epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
            seed: int | None = None, bits: int | None = SKETCH_BITS) -> routing.Stats:
    """The (``epsilon``, ``delta``)-DP release of ``c`` (module docstring). ``seed`` None draws the noise
    from the OS's entropy (what an owner publishes); a seed is for reproducible tests only."""
    z = noise_multiplier(float(epsilon), float(delta))
    uni, pairs = document_sum(c, bits)
    rng = np.random.default_rng(seed)
    sigma = z * L2_CLIP
    noisy = [(x + rng.normal(0.0, sigma, x.shape)).astype(np.float32) for x in (uni, pairs)]
    record = {"mechanism": MECHANISM, "epsilon": float(epsilon), "delta": float(delta), "unit": UNIT,
              "noise_multiplier": z, "l2_clip": L2_CLIP, "noise_std": sigma, "sketch_bits": bits,
              "accountant": "dp_accounting.pld.PLDAccountant (add or remove one document)",
              "epsilon_accounted": epsilon_of(z, delta), "post_processing": "none (raw noisy sums)"}
    source = {k: c.source[k] for k in ("task", "split", "vocab_size")}
    return routing.Stats(name, noisy[0], source, sketch=noisy[1] if bits is not None else None, release=record)


def fit(data_dir: str | os.PathLike, task: str, name: str, split: str = "train", seq_len: int = 128,
        max_tokens: int | None = None, vocab_size: int | None = None, epsilon: float = DEFAULT_EPSILON,
        delta: float = DEFAULT_DELTA, seed: int | None = None) -> routing.Stats:
    """Count ``task``'s ``split`` (:func:`flexmoe_jax.routing.count`) and :func:`release` it."""
    check_budget(epsilon, delta)
    return release(routing.count(data_dir, task, split, seq_len, max_tokens, vocab_size), name, epsilon, delta, seed)


def publish(data_dir, task: str, name: str, *, exact: bool = False, **kw) -> routing.Stats:
    """What a command writes: the private release, or with ``exact`` the exact counts (which disclose
    the data; the caller warns)."""
    if exact:
        kw = {k: v for k, v in kw.items() if k not in ("epsilon", "delta", "seed")}
        return routing.fit(data_dir, task, name, **kw)
    return fit(data_dir, task, name, **kw)


def describe(stats: routing.Stats) -> str:
    """One line on what ``stats`` disclose, for commands' output."""
    if stats.exact:
        return (f"EXACT counts of {stats.source.get('documents', '?')} documents: they disclose which strings "
                "the data holds (membership of names, addresses, identifiers); do not publish them")
    r = stats.release
    return (f"({r['epsilon']:g}, {r['delta']:g})-DP per {r['unit']} ({r['mechanism']} noise std "
            f"{r['noise_std']:.2f} in every one of {stats.counts.size:,} unigram and "
            f"{0 if stats.sketch is None else stats.sketch.size:,} pair entries)")
