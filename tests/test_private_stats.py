"""Privately released routing stats (flexmoe_jax.private_stats): the accounting, the contribution
bound per document, what the release records, and that domain routing still works on it."""

import math

import numpy as np
import pytest

from flexmoe_jax import private_stats, routing
from flexmoe_jax.errors import UserError


def _gaussian_delta(eps: float, sigma: float) -> float:
    """delta(eps) of one Gaussian mechanism with L2 sensitivity 1 (Balle & Wang 2018, Theorem 8)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)


@pytest.mark.parametrize("eps", [0.5, 1.0, 4.0])
def test_noise_multiplier_meets_the_budget_by_the_analytic_formula(eps):
    z = private_stats.noise_multiplier(eps, 1e-6)
    assert _gaussian_delta(eps, z) <= 1e-6 * 1.05  # the accountant's answer holds by the exact formula
    assert _gaussian_delta(eps, z * 0.97) > 1e-6  # and is not much more noise than needed
    assert private_stats.epsilon_of(z, 1e-6) <= eps + 1e-6


def test_bad_budgets_are_clear_errors():
    for eps, delta in ((0, 1e-6), (-1, 1e-6), (float("inf"), 1e-6), (1.0, 0.0), (1.0, 0.01)):
        with pytest.raises(UserError, match="epsilon|delta"):
            private_stats.check_budget(eps, delta)


def _counted(docs, V):
    ids, prev, doc = [], [], []
    for i, d in enumerate(docs):
        ids += d
        prev += [0] + d[:-1]
        doc += [i] * len(d)
    return routing.Counted(np.array(ids), np.array(prev), np.array(doc), len(docs), V,
                           {"task": "t", "split": "train", "vocab_size": V})


def test_one_document_moves_the_sum_by_at_most_the_clip():
    """The sensitivity the accounting assumes: removing any one document (short, long, repetitive)
    changes the pre-noise sum by at most L2_CLIP in L2 norm."""
    rng = np.random.default_rng(0)
    V = 50
    docs = [rng.integers(1, V, size=n).tolist() for n in (1, 3, 40, 400)] + [[7] * 300, [5, 6] * 100]
    full = np.concatenate(private_stats.document_sum(_counted(docs, V), bits=10))
    for i in range(len(docs)):
        rest = np.concatenate(private_stats.document_sum(_counted(docs[:i] + docs[i + 1:], V), bits=10))
        assert np.linalg.norm(full - rest) <= private_stats.L2_CLIP + 1e-9
    one = np.concatenate(private_stats.document_sum(_counted([[7] * 300], V), bits=10))
    assert np.linalg.norm(one) == pytest.approx(private_stats.L2_CLIP)  # a long document is clipped to it


def test_release_records_the_mechanism_and_nothing_counted():
    rng = np.random.default_rng(1)
    V = 64
    c = _counted([rng.integers(1, V, size=30).tolist() for _ in range(20)], V)
    a = private_stats.release(c, "owner", epsilon=1.0, seed=3, bits=12)
    b = private_stats.release(c, "owner", epsilon=1.0, seed=3, bits=12)
    other = private_stats.release(c, "owner", epsilon=1.0, bits=12)  # OS entropy
    np.testing.assert_array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, other.counts)
    r = a.release
    assert (r["epsilon"], r["delta"], r["unit"], r["mechanism"]) == (1.0, 1e-6, "document", "gaussian")
    assert r["noise_std"] == pytest.approx(private_stats.noise_multiplier(1.0) * private_stats.L2_CLIP)
    assert a.source == {"task": "t", "split": "train", "vocab_size": V} and not a.exact
    # The noise is what the record says: released minus the exact sum has that spread, in every entry.
    uni, pairs = private_stats.document_sum(c, bits=12)
    resid = np.concatenate([a.counts - uni, a.sketch - pairs])
    assert resid.std() == pytest.approx(r["noise_std"], rel=0.05) and abs(resid.mean()) < 0.1 * r["noise_std"]
    assert np.count_nonzero(resid) == resid.size


def test_save_load_and_domain_routing_on_releases(tmp_path):
    """Two owners whose texts use disjoint halves of the vocabulary and a public expert over all of it:
    a router built from their releases (epsilon 2) sends each owner's text to that owner."""
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    V = 64
    pools = {"public": np.arange(2, V), "a": np.arange(2, 33), "b": np.arange(33, V)}
    texts = {n: [rng.choice(p, size=60).tolist() for _ in range(400)] for n, p in pools.items()}
    stats = {}
    for n in pools:
        s = private_stats.release(_counted(texts[n], V), n, epsilon=2.0, seed=4, bits=12)
        stats[n] = routing.Stats.load(s.save(tmp_path / f"{n}.npz"))
        assert stats[n].release == s.release and np.array_equal(stats[n].sketch, s.sketch)
    router = routing.DomainRouter.build(stats, ("public", "a", "b"), V)
    assert router.order == 2 and router.table.bigrams.shape == (3, 1 << 12)
    for e, n in ((1, "a"), (2, "b")):
        toks = jnp.asarray([rng.choice(pools[n], size=48)], jnp.int32)
        pos = jnp.arange(48)[None]
        got = np.asarray(routing.domain_of(router.table, toks, pos, jnp.ones_like(toks)))
        assert (got[0, 8:] == e).mean() > 0.9, (n, got)
    with pytest.raises(UserError, match="sketches of different sizes"):
        small = private_stats.release(_counted(texts["a"], V), "a", epsilon=2.0, seed=4, bits=10)
        routing.DomainRouter.build({**stats, "a": small}, ("public", "a", "b"), V)
