"""The routing ablation's measures, computed from results the way the demo writes them."""

import json

import pytest

from flexmoe_jax.demo import ablations


def _res(per):
    return {d: {"bpb": v} for d, v in per.items()}


def test_summary_measures_and_table(tmp_path):
    domains = ["code", "math"]
    base = {"public": _res({"code": 4.0, "math": 3.0, "public": 2.0}),
            "expert_code": _res({"code": 3.0, "math": 3.5, "public": 2.2}),
            "expert_math": _res({"code": 4.5, "math": 2.0, "public": 2.2}),
            "flexolmo": _res({"code": 3.8, "math": 2.8, "public": 2.3}), "btm": _res({"code": 3.1, "math": 2.1})}
    results = {"hidden/bias/domain": _res({"code": 3.0, "math": 2.1, "public": 2.04})}
    routes = {"hidden/bias/domain": {"code": {"own": 0.7, "group": 0.9, "picked": {}},
                                     "math": {"own": 0.95, "picked": {}},
                                     "public": {"own": None, "picked": {"public": 1.0}}}}
    s = ablations.summarize(base, results, routes, domains, list(results))
    r = s["rows"]["hidden/bias/domain"]
    # FlexOlmo 3.3, oracle 2.5, row 2.55: (3.3 - 2.55) / (3.3 - 2.5) = 0.9375 of the gap closed.
    assert r["gap_closed"] == pytest.approx(0.9375)
    assert r["gain_kept"] == pytest.approx({"code": 1.0, "math": 0.9})
    assert r["public_vs_public_model"] == pytest.approx(0.02)
    assert r["own_share"] == {"code": 0.7, "math": 0.95} and r["code_or_techdocs"] == 0.9
    assert r["public_share_of_public"] == 1.0
    s["learned_bias"] = {"merged": {"public": 0.0, "code": -0.25}}
    ablations.write(tmp_path, s)
    md = (tmp_path / "ablations.md").read_text()
    assert "| hidden/bias/domain | 2.5500 | 94% | +2.0% | 90% | 70%, 95% | 90% | 100% |" in md
    assert "btm 2.6000" in md and "code -0.250" in md
    assert json.loads((tmp_path / "ablations.json").read_text())["rows"]["hidden/bias/domain"]["own_share"]
    assert (tmp_path / "ablations.png").stat().st_size > 0


def test_needs_a_finished_demo(tmp_path):
    with pytest.raises(ValueError, match="flexmoe demo"):
        ablations.run(tmp_path)


def test_anchor_strength_measures_and_table():
    from flexmoe_jax.demo import anchor_strength

    res = {"public": _res({"code": 4.0, "math": 3.0, "public": 2.0}),
           "expert_code": _res({"code": 3.5, "public": 2.2}), "dense_code": _res({"code": 3.0, "public": 3.0}),
           "expert_math": _res({"math": 2.0, "public": 2.4}), "dense_math": _res({"math": 1.0, "public": 3.4})}
    m = anchor_strength.measures(res, ["code", "math"])
    assert m["per_domain"]["code"]["expert_share_of_dense_gain"] == pytest.approx(0.5)
    assert m["per_domain"]["math"]["expert_share_of_dense_gain"] == pytest.approx(0.5)
    # public 3.5 on average, expert oracle 2.75, dense oracle 2.0: 0.75 of 1.5
    assert (m["expert_oracle"], m["dense_oracle"]) == (pytest.approx(2.75), pytest.approx(2.0))
    assert m["expert_share_of_dense_gain"] == pytest.approx(0.5)
    assert (m["experts_on_public"], m["dense_on_public"]) == (pytest.approx(2.3), pytest.approx(3.2))
    md = anchor_strength.table({"domains": ["code", "math"], "rows": {"200": m}})
    assert "| 200 | 2.0000 / 3.5000 | 2.7500 | 2.0000 | 50% | 50%, 50% | 2.3000 / 3.2000 |" in md


def test_anchor_strength_needs_a_finished_demo(tmp_path):
    from flexmoe_jax.demo import anchor_strength

    with pytest.raises(ValueError, match="flexmoe demo"):
        anchor_strength.run(tmp_path, [800])
