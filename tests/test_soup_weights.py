"""Weighted soup: mixing weights fit on public batches only (flexmoe_jax.soup_weights)."""

import itertools

import jax
import numpy as np
import pytest

from flexmoe_jax import eval as ev, model, soup_weights
from flexmoe_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=64, init_std=0.1)
SEQ, BS = 64, 4


def public_batches(data_dir):
    from flexmoe_jax import data

    data.register_tasks(data_dir)
    return data.batches("flexmix_mini.public", "validation", BS, SEQ, data_dir, seed=3)


def noisy(params, scale, seed):
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(np.float32)
                                     for x in leaves])


def test_fit_moves_weight_to_the_member_that_predicts_public_text(data_dir):
    good = (CFG, model.init(CFG, 0))
    bad = (CFG, noisy(good[1], 0.5, 1))
    w, report = soup_weights.fit([good, bad], public_batches(data_dir), steps=12, learning_rate=0.2)
    assert w.shape == (2,) and np.isclose(w.sum(), 1.0) and np.all(w >= 0)
    assert w[0] > 0.75, report
    # Held-out public batches (not fit on) are better predicted by the fitted soup than the uniform one.
    assert report["heldout_loss_fitted"] < report["heldout_loss_uniform"], report
    # The fitted weights reproduce the loss the report states, through the ordinary soup.
    cfg, params = ev.soup([good, bad], w)
    batch = next(iter(public_batches(data_dir)))
    ce = float(soup_weights._ce(cfg, params, batch))
    assert np.isfinite(ce)


def test_identical_members_stay_uniform(data_dir):
    m = (CFG, model.init(CFG, 0))
    w, _ = soup_weights.fit([m, m, m], public_batches(data_dir), steps=3, num_eval_batches=1)
    np.testing.assert_allclose(w, [1 / 3] * 3, atol=1e-6)


def test_clear_errors(data_dir):
    m = (CFG, model.init(CFG, 0))
    with pytest.raises(ValueError, match="at least two members"):
        soup_weights.fit([m], public_batches(data_dir))
    with pytest.raises(ValueError, match="public batches"):
        soup_weights.fit([m, m], itertools.islice(public_batches(data_dir), 2), steps=4, num_eval_batches=1)
    other = CFG.replace(d_model=16, mlp_hidden=32)
    with pytest.raises(ValueError, match="architecture"):
        soup_weights.fit([m, (other, model.init(other, 0))], public_batches(data_dir), steps=1)
