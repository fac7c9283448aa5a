"""``flexmoe demo --quick`` end to end, as a user runs it (a subprocess), and what it leaves behind."""

import json
import re
import subprocess
import sys
import time

import pytest

from flexmoe_jax import checkpoint, data, demo, loading

DOMAINS = list(data.CLOSED_DOMAINS)


def test_quick_demo_outputs(quick_demo):
    res = quick_demo["dir"] / "results"
    for name in ("results.md", "results.json", "findings.json", "flops.json", "timing.json", "privacy.json",
                 "routing.json", "private_routing.json", "audit.json"):
        assert (res / name).is_file(), name
    for png in ("baselines.png", "experts.png", "opt_out.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((res / "results.json").read_text())
    expected = {"public", "soup", "soup_weighted", "soup_input", "btm", "btm_per_token", "btx", "unrestricted",
                "unrestricted_equal_data", "unrestricted_half_data",
                "soup_flexolmo_experts",
                "btm_all", "btx_alldata",
                "flexolmo", "flexolmo_replay", "flexolmo_domain", *[f"expert_{d}" for d in DOMAINS],
                *[f"dense_{d}" for d in DOMAINS], *[f"flexolmo_minus_{d}" for d in DOMAINS]}
    assert expected <= set(results)
    # The weighted soup's weights: one per member (public first), fit on public data, summing to 1.
    sw = json.loads((res / "soup_weights.json").read_text())
    assert sw["members"] == ["public", *DOMAINS] and len(sw["weights"]) == len(DOMAINS) + 1
    assert abs(sum(sw["weights"]) - 1) < 1e-5 and min(sw["weights"]) >= 0
    assert results["soup_weighted"]["average"]["bpb"] != results["soup"]["average"]["bpb"]
    # Each dense expert is a whole dense model continued on its owner's data only.
    from flexmoe_jax import checkpoint

    for d in DOMAINS:
        meta = checkpoint.load_metadata(str(quick_demo["dir"] / "experts_dense" / d / "model"))
        assert meta["phase"] == "dense" and meta["task"] == f"flexmix_mini.{d}"
        # ... trained in its own process on its own data directory only (no other owner's data).
        assert f"owners/{d}/data" in meta["gin_config"] and not any(
            f"owners/{o}/data" in meta["gin_config"] for o in DOMAINS if o != d)
        assert not checkpoint.load_config(str(quick_demo["dir"] / "experts_dense" / d / "model")).is_moe
    for name, per in results.items():
        for d in [*DOMAINS, "public"]:
            assert 0 < per[d]["bpb"] < 20, (name, d)
    report = (res / "results.md").read_text()
    assert "## Findings" in report and "flexolmo_minus_code" in report and "Training-data extraction" in report
    assert "**Prior merging methods" in report and "**Unrestricted MoE" in report  # the paper's Table 1 groups
    privacy = json.loads((res / "privacy.json").read_text())
    for name, per in privacy.items():  # train documents are ones the owner's run trained on
        for d, splits in per.items():
            assert splits["train"]["selection"]["trained_on"] is True, (name, d)
            assert splits["train"]["selection"]["unit"] == splits["test"]["selection"]["unit"] == "piece"
            assert splits["test"]["selection"]["trained_on"] is False, (name, d)
            assert splits["train"]["selection"]["run"]["run_dir"].endswith(f"experts/{d}"), (name, d)
    assert "--quick" in quick_demo["stdout"] or "FlexOlmo on FlexMix-mini" in quick_demo["stdout"]
    # Private routing: the default release, exact counts and density routing, scored side by side; the
    # audit of every owner's deliverable (private stats, weights, a manifest that records nothing of it).
    rows = json.loads((res / "private_routing.json").read_text())["rows"]
    assert {"flexolmo_domain_eps1", "flexolmo_domain_exact", "flexolmo_density"} <= set(rows)
    assert rows["flexolmo_density"]["inference_flops_vs_merged"] > len(DOMAINS)
    audit = json.loads((res / "audit.json").read_text())
    for d in DOMAINS:
        pub = audit[d]["published"]
        assert pub["artifacts"]["stats"]["release"]["epsilon"] == 1.0 and pub["verdict"]["manifest_pass"], d
        assert "membership" in pub["artifacts"]["weights"] and audit[d]["exact_stats"]["artifacts"]["stats"]
    assert audit["merged_manifest"] == [] and "Privacy audit of what each owner published" in report
    # Mixed-domain documents: every row scored on them, and the per-document owner oracle is at least
    # as good as every single owner model (it picks the best one per document).
    mixed = json.loads((res / "mixed_summary.json").read_text())
    bpb = mixed["bpb"]
    assert {"flexolmo", "flexolmo_density", "btm", "btm_per_token", "owner_per_doc_oracle"} <= set(bpb)
    assert all(bpb["owner_per_doc_oracle"] <= bpb[f"expert_{d}"] + 1e-9 for d in DOMAINS)
    assert abs(sum(mixed["oracle_picks"].values()) - 1) < 1e-9 and "## Mixed-domain documents" in report
    assert "flexolmo" in mixed["vs_owner_oracle"] and mixed["documents"]["n_docs"] == 40


def test_report_numbers_are_the_measured_ones(quick_demo):
    """Every "<model>: average bpb X" sentence of results.md quotes results.json; routing shares sum
    to the top-k; the findings' differences are differences of the measured numbers."""
    res = quick_demo["dir"] / "results"
    results = json.loads((res / "results.json").read_text())
    report = (res / "results.md").read_text()
    f = json.loads((res / "findings.json").read_text())
    quoted = re.findall(r"^- ([a-z0-9_]+): average bpb (\d+\.\d{4}), ([+-]\d+\.\d)% vs FlexOlmo", report, re.M)
    assert len(quoted) >= 8, report[:3000]
    flex = results["flexolmo"]["average"]["bpb"]
    for name, value, pct in quoted:
        assert float(value) == round(results[name]["average"]["bpb"], 4), name
        assert float(pct) == pytest.approx(round(100 * (results[name]["average"]["bpb"] - flex) / flex, 1), abs=0.051)
    head = re.search(r"average bpb (\d+\.\d{4}) vs (\d+\.\d{4})", report)
    assert (float(head[1]), float(head[2])) == (round(flex, 4), round(results["public"]["average"]["bpb"], 4))
    routing = json.loads((res / "routing.json").read_text())
    for d in DOMAINS:  # top-2 of 6: each token's two picks, shares summed over experts
        assert sum(routing["flexolmo"][d]["picked"].values()) == pytest.approx(2.0, abs=1e-5)
        assert routing["flexolmo"][d] == results["flexolmo"][d]["routing"]  # counted in the scoring passes
        domain = routing["flexolmo_domain"][d]["picked"]  # public alone, or {public, the domain}
        assert domain["public"] == pytest.approx(1.0) and 1.0 - 1e-5 <= sum(domain.values()) <= 2.0 + 1e-5
    beats = [d for d in DOMAINS if results["flexolmo"][d]["bpb"] < results["public"][d]["bpb"]]
    assert f["flexolmo_beats_public_on"] == beats
    d = DOMAINS[0]
    own = results[f"flexolmo_minus_{d}"][d]["bpb"] - results["flexolmo"][d]["bpb"]
    assert f["opt_out"][d]["bpb_change_own"] == pytest.approx(own)


def test_every_model_is_scored_on_the_recorded_sample(quick_demo):
    """The sample each result records is the documents scored (per-document scores, routing tokens),
    the same for every model, and results.md prints it; intervals bracket the measured numbers."""
    from flexmoe_jax import eval as ev
    from flexmoe_jax.data import eval_sample as sample

    w = quick_demo["dir"]
    res = w / "results"
    results = json.loads((res / "results.json").read_text())
    docs = json.loads(ev.docs_path(res / "results.json").read_text())
    routing = json.loads((res / "routing.json").read_text())
    report = (res / "results.md").read_text()
    plan = json.loads((w / demo.PLAN_FILE).read_text())
    for d in [*DOMAINS, "public"]:
        task = "flexmix_mini.public" if d == "public" else f"flexmix_mini.{d}"
        s = sample.draw(w / "data", task, "test", plan["seq_len"], plan["eval_tokens"],
                        max_doc_tokens=plan["eval_doc_tokens"])
        for name, per in results.items():
            assert per[d]["sample"] == s.size(), (name, d)
            assert len(docs[name][d]["doc_nll"]) == s.num_docs
            assert docs[name][d]["doc_bytes"] == s.doc_bytes.tolist()
            lo, hi = per[d]["bpb_ci"]
            assert lo <= per[d]["bpb"] <= hi, (name, d)
        assert routing["flexolmo"][d]["tokens"] == s.doc_tokens.sum()
        assert f"| {d} | {s.num_docs} | {int(s.doc_tokens.sum()):,} | {int(s.doc_bytes.sum()):,} |" in report
    f = json.loads((res / "findings.json").read_text())
    for m, per in f["intervals"]["vs_flexolmo"].items():
        ours = results["flexolmo"]["average"]["bpb"]
        rel = (results[m]["average"]["bpb"] - ours) / ours
        lo, hi = per["average"]["ci"]
        assert lo - 1e-9 <= rel <= hi + 1e-9, m


def test_each_owner_saw_only_its_own_data(quick_demo):
    from flexmoe_jax.data import layout

    w = quick_demo["dir"]
    for d in DOMAINS:
        owner = w / "owners" / d / "data"
        built = sorted(p.name for p in (layout.tfds_dir(owner) / layout.FLEXMIX_NAME).iterdir())
        assert built == sorted([*data.PUBLIC_SOURCES, d])
        assert set(json.loads((owner / "card.json").read_text())["configs"]) == {*data.PUBLIC_SOURCES, d}
        meta = checkpoint.load_metadata(w / "experts" / d / "model")
        gin_text = re.sub(r"\\\n\s*", "", meta["gin_config"])  # gin wraps long lines with "\"
        line = [x for x in gin_text.splitlines() if x.startswith("RunConfig.data_dir")]
        assert line == [f"RunConfig.data_dir = '{owner}'"], line
        assert (w / "experts" / d / "train.log").is_file()  # trained by its own process
        replay = checkpoint.load_metadata(w / "experts_replay" / d / "model")["gin_config"]
        assert f"RunConfig.public_replay = {demo.QUICK.public_replay}" in replay
    m = loading.read_manifest(w / "merged")
    assert [e["name"] for e in m["experts"]] == ["public", *DOMAINS]


def test_unrestricted_moe_gets_the_owners_flops(quick_demo):
    res = quick_demo["dir"] / "results"
    flops = json.loads((res / "flops.json").read_text())
    assert flops["unrestricted"]["vs_flexolmo"] == pytest.approx(1.0, rel=0.02)
    assert flops["btx"]["vs_flexolmo"] > 1.0
    cfg = checkpoint.load_config(quick_demo["dir"] / "unrestricted" / "model")
    assert (cfg.num_experts, cfg.top_k) == (demo.QUICK.unrestricted_experts, demo.QUICK.top_k)


def test_rerun_resumes_without_training_again(quick_demo, demo_env):
    w = quick_demo["dir"]
    stamp = (w / "merged" / checkpoint.MARKER_NAME).stat().st_mtime_ns
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "demo", "--quick", "--workdir", str(w)],
                       capture_output=True, text=True, env=demo_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (w / "merged" / checkpoint.MARKER_NAME).stat().st_mtime_ns == stamp
    assert time.perf_counter() - t < quick_demo["seconds"] / 2


def test_other_mode_in_same_workdir_is_refused(quick_demo, demo_env):
    r = subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "demo", "--workdir", str(quick_demo["dir"])],
                       capture_output=True, text=True, env=demo_env, timeout=120)
    assert r.returncode == 2
    assert "quick" in r.stderr and "--workdir" in r.stderr


def test_owner_data_dir_keeps_only_public_and_own(quick_demo, tmp_path):
    w = quick_demo["dir"]
    out = demo.owner_data_dir(w / "data", "math", tmp_path / "owner")
    names = data.register_tasks(out)
    assert "flexmix_mini.math" in names and "flexmix_mini.code" not in names
    assert data.PUBLIC_MIXTURE in names


def test_cpu_slots_split_the_cpus_into_disjoint_sets(monkeypatch):
    import os

    from flexmoe_jax.demo import experts

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5})
    monkeypatch.setattr(experts.shutil, "which", lambda name: "/usr/bin/taskset")
    assert experts.cpu_slots(2) == [[0, 2, 5], [1, 3]]
    assert experts.cpu_slots(5) == [[0], [1], [2], [3], [5]]
    assert experts.cpu_slots(1) is None  # one process keeps every CPU
    assert experts.cpu_slots(6) is None  # more processes than CPUs: no pinning
    monkeypatch.setattr(experts.shutil, "which", lambda name: None)
    assert experts.cpu_slots(2) is None  # no taskset on this machine


def test_sample_table_reports_the_spread_and_documents_for_one_percent():
    from flexmoe_jax.demo import report as demo_report

    size = {"docs": 10, "tokens": 500, "bytes": 1500, "whole_split": True}
    results = {"public": {"code": {"bpb": 2.0, "bpb_ci": [1.96, 2.04], "sample": size},
                          "average": {"bpb": 2.0}},
               "other": {"code": {"bpb": 1.0, "bpb_ci": [0.5, 1.5], "sample": size}}}
    rows = demo_report.sample_table(results)
    assert "public bpb +-95%" in rows[0]
    # +-2% from 10 documents: +-1% needs 10 * 2**2 = 40
    assert rows[2] == "| code | 10 | 500 | 1,500 | all | 2.0% | 40 |"
    assert len(rows) == 3


def test_full_plan_is_proportioned_like_the_paper():
    """The default full plan meets the paper-regime targets by construction (issue 29): FFNs >= 50% of
    the parameters, embeddings + head <= 25%, >= 4 anchor tokens per parameter, each expert <= 1/20 of
    the anchor's tokens, public training bytes >= 10x each closed domain's; the old plan stays by name."""
    from flexmoe_jax.data import pipeline, sources, splits

    p = demo.FULL
    cfg = p.model_config()
    n = cfg.num_params()
    assert 3 * cfg.d_model * cfg.mlp_hidden * cfg.n_layers >= 0.5 * n
    assert 2 * cfg.vocab_size * cfg.d_model <= 0.25 * n
    assert p.anchor_steps * p.batch_size * p.seq_len >= 4 * n
    assert 20 * p.expert_steps <= p.anchor_steps
    public_train = sum(pipeline.DEFAULT_MAX_BYTES[c] * splits.SPLIT_PERCENT["train"] / 100
                       for c in sources.PUBLIC_SOURCES)
    assert public_train >= 10 * p.max_train_bytes_closed
    old = demo.PLANS["inverted"]
    assert old.anchor_steps * old.batch_size * old.seq_len < 0.2 * old.model_config().num_params()


def test_plan_selection_and_the_recorded_plan(tmp_path):
    from flexmoe_jax.demo import plan

    assert plan.select() is demo.FULL and plan.select(True) is demo.QUICK
    assert plan.select(plan="inverted") is demo.FULL_INVERTED
    with pytest.raises(demo.DemoError, match="unknown demo plan 'huge'"):
        plan.select(plan="huge")
    with pytest.raises(demo.DemoError, match="--quick is its own plan"):
        plan.select(True, "inverted")
    assert plan.recorded(tmp_path) is demo.FULL  # nothing recorded: the default
    plan.claim(tmp_path, demo.FULL_INVERTED)
    assert plan.recorded(tmp_path) is demo.FULL_INVERTED
    with pytest.raises(demo.DemoError, match="mode 'inverted'"):
        plan.claim(tmp_path, demo.FULL)
