"""The one rule for which experts run and with what top-k (flexmoe_jax.selection)."""

import numpy as np
import pytest

from flexmoe_jax import model, selection
from flexmoe_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32, max_seq_len=16,
                  num_experts=4, top_k=2, expert_names=("public", "math", "code", "law"))


def test_names_slots_and_the_top_k_rule():
    assert selection.resolve(CFG, ["law", 0]) == (0, 3)
    assert selection.kept(CFG) is None
    assert selection.kept(CFG, exclude="math") == (0, 2, 3)  # one name, not its letters
    assert selection.kept(CFG, include=["code", "public"]) == (0, 2)
    cfg, keep = selection.plan(CFG, exclude=["math", "code", "law"])
    assert keep == (0,) and cfg.top_k == 1 and cfg.names == ("public",)  # stored top-k capped
    cfg, keep = selection.plan(CFG, top_k=3)
    assert keep is None and cfg.top_k == 3 and cfg.num_experts == 4
    for kwargs, msg in [(dict(include=["math"], exclude=["law"]), "not both"),
                        (dict(exclude=["public", "math", "code", "law"]), "cannot exclude every expert"),
                        (dict(include=["math", "math"]), "listed twice"),
                        (dict(include=["m"]), "unknown expert 'm'"),
                        (dict(include=[7]), "out of range"),
                        (dict(include=["math"], top_k=2), "top_k=2 must be between 1 and the 1 active"),
                        (dict(top_k=5), "top_k=5 must be between 1 and the 4 experts")]:
        with pytest.raises(ValueError, match=msg):
            selection.plan(CFG, **kwargs)
    with pytest.raises(ValueError, match="dense model"):
        selection.plan(CFG.replace(num_experts=0, expert_names=()), top_k=1)


def test_in_memory_select_is_a_slice_of_the_expert_axis():
    params = model.init(CFG, 0)
    cfg, p = selection.exclude(CFG, params, "math")
    assert cfg.names == ("public", "code", "law")
    np.testing.assert_array_equal(np.asarray(p["layers"]["moe"]["gate"]),
                                  np.asarray(params["layers"]["moe"]["gate"])[:, [0, 2, 3]])
    toks = np.arange(1, 9, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(model.forward(cfg, p, toks)),
                                  np.asarray(model.forward(CFG, params, toks, active_experts=["public", "code",
                                                                                              "law"])))
