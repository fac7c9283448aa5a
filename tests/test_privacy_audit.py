"""The privacy audit (flexmoe_jax.privacy.audit, `flexmoe privacy audit`): each attack finds the leak in
a deliberately leaky artifact (exact count tables), reports chance on a control that holds none of the
text attacked, and the default private release passes.

The owner's corpus is full of what a privacy officer worries about: the Debian copyright files of this
machine (``/usr/share/doc/*/copyright``: maintainers' names and e-mail addresses), cut into documents,
registered with `flexmoe data register`, with planted canaries (random secrets inserted 1, 4 and 16
times). Members: strings in exactly one training document; non-members: strings only in test documents.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexmoe_jax.privacy import attacks, audit, canaries

OWNER = "maintainers"
DOC_CHARS = 1500
MAX_DOCS = 900


def copyright_documents() -> list[str]:
    """This machine's Debian copyright files, each read once, as documents of whole paragraphs."""
    docs, seen = [], set()
    for f in sorted(Path("/usr/share/doc").glob("*/copyright")):
        real = f.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        cur = ""
        for p in re.split(r"\n\s*\n", real.read_text(encoding="utf-8", errors="replace")):
            cur = f"{cur}\n\n{p.strip()}" if cur else p.strip()
            if len(cur) >= DOC_CHARS:
                docs.append(cur)
                cur = ""
        if cur:
            docs.append(cur)
    # Spread over every package (not the first few long files): every k-th document.
    step = max(1, len(docs) // MAX_DOCS)
    return docs[::step][:MAX_DOCS]


@pytest.fixture(scope="module")
def owner(small_data_dir, tmp_path_factory):
    from flexmoe_jax import data, demo, private_stats, routing

    docs = copyright_documents()
    emails = {m for d in docs for m in re.findall(audit.PATTERNS["email"], d)}
    if len(docs) < 150 or len(emails) < 150:
        pytest.skip(f"this machine has too few Debian copyright files ({len(docs)} documents, {len(emails)} addresses)")
    root = tmp_path_factory.mktemp("audit")
    data_dir = demo.owner_data_dir(small_data_dir, "humor", root / "data")
    marks = canaries.make(per_repeat=4, seed=0)
    corpus = root / "files"
    corpus.mkdir()
    for i, text in enumerate(canaries.plant(docs, marks, seed=0)):
        (corpus / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    data.register(OWNER, f"{corpus}/*.txt", data_dir, progress=False, log=lambda m: None)
    files = {"canaries": canaries.save(root / "canaries.json", marks)}
    made = {"exact": routing.fit(data_dir, OWNER, OWNER, seq_len=64),
            "released": private_stats.fit(data_dir, OWNER, OWNER, seq_len=64, seed=0),
            # the control: exact counts of other text (FlexMix-mini humor), holding neither members nor non-members
            "control": routing.fit(data_dir, "flexmix_mini.humor", OWNER, seq_len=64),
            "public": routing.fit(data_dir, "flexmix_mini.public", "public", seq_len=64)}
    for k, s in made.items():
        files[k] = s.save(root / f"{k}.npz")
    reports = {k: audit.audit(files[k], data_dir, task=OWNER, reference_stats=files["public"],
                              canary_file=files["canaries"]) for k in ("exact", "released", "control")}
    for k, r in reports.items():
        print(f"\n--- {k}\n{audit.markdown(r)}")
    return {"data_dir": data_dir, "files": files, "reports": reports}


def _aucs(report, key="membership"):
    return {k: m["auc"] for k, m in report["artifacts"]["stats"][key].items()}


def _z(report, key):
    """Each kind's AUC in standard errors above chance."""
    return {k: (m["auc"] - 0.5) / max(m["auc_se"], 1e-9) for k, m in report["artifacts"]["stats"][key].items()}


@pytest.mark.slow
def test_exact_tables_fail_every_stats_attack(owner):
    r = owner["reports"]["exact"]
    kinds = {"email", "name"} & set(r["strings"])  # those with enough members and non-members here
    assert kinds, r["strings"]
    # "Every pair of it is in the table": with this test's 512-token vocabulary an address is many
    # short pieces whose pairs are common, so the signal is weaker than at real vocabularies
    # (docs/privacy.md measures 4096), but it is there, several standard errors above chance.
    z = _z(r, "membership_min_pair")
    assert max(z[k] for k in kinds) > 3, (z, _aucs(r, "membership_min_pair"))
    exp = r["artifacts"]["stats"]["canary_exposure_bits"]
    assert exp["16"] > 6 and exp["16"] > exp["1"], exp  # out of 8 bits: the often-planted secrets are exposed
    assert not r["verdict"]["pass"] and not r["verdict"]["stats_canary_pass"]


@pytest.mark.slow
def test_the_control_reports_chance(owner):
    """Exact counts of text that holds neither class: no attack separates them."""
    r = owner["reports"]["control"]
    for key in ("membership", "membership_min_pair"):
        assert max(abs(v) for v in _z(r, key).values()) < 3, (key, _aucs(r, key))
    assert max(r["artifacts"]["stats"]["canary_exposure_bits"].values()) < 3.5
    assert r["verdict"]["stats_canary_pass"]


@pytest.mark.slow
def test_the_private_release_passes(owner):
    r = owner["reports"]["released"]
    for key in ("membership", "membership_min_pair"):
        assert max(_aucs(r, key).values()) <= 0.6 and max(_z(r, key).values()) < 3, _aucs(r, key)
    assert max(r["artifacts"]["stats"]["canary_exposure_bits"].values()) < 3.5
    assert r["verdict"]["pass"], r["verdict"]
    comp = r["artifacts"]["stats"]["completion"]
    assert all(c["members"] <= c["nonmembers"] + 0.02 for c in comp.values()), comp
    assert r["artifacts"]["stats"]["release"]["epsilon"] == 1.0


@pytest.mark.slow
def test_audit_command_line(owner, tmp_path):
    f = owner["files"]
    out = tmp_path / "audit.json"
    r = subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "privacy", "audit", str(f["exact"]), "--data",
                        str(owner["data_dir"]), "--reference_stats", str(f["public"]), "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]  # the exact table fails the audit
    assert "min pair count |" in r.stdout and "verdict: FAIL" in r.stdout
    assert json.loads(out.read_text())["verdict"]["pass"] is False
    bad = subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "privacy", "audit", str(tmp_path), "--data",
                          str(owner["data_dir"])], capture_output=True, text=True)
    assert bad.returncode == 2 and "neither an owner's run directory" in bad.stderr


def test_auc_and_exposure_against_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 40).astype(float)  # with ties
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert attacks.auc(a, b) == pytest.approx(brute)
    assert attacks.exposure(1000.0, np.arange(255.0)) == pytest.approx(8.0)  # ranked first of 256
    assert attacks.exposure(-1.0, np.arange(255.0)) == pytest.approx(0.0)  # ranked last


def test_completion_and_chains_on_a_toy_table():
    from flexmoe_jax import routing

    V = 20
    seq = [3, 7, 11, 5, 9]
    ids = np.array([a * V + b for a, b in zip(seq[:-1], seq[1:])])
    stats = routing.Stats("o", np.bincount(seq, minlength=V).astype(np.int64), {"vocab_size": V}, ids,
                          np.ones(len(ids), np.int64))
    m = attacks.PairModel(stats)
    assert attacks.complete(m, [seq]) == 1.0 and attacks.complete(m, [[3, 7, 12]]) == 0.0
    got = attacks.chain_spans(m, [3], 5, 3, {"trained": attacks.ngrams([seq], 3), "held_out": set()})
    assert got["in_trained"] == 1.0 and got["in_held_out"] == 0.0


def test_manifest_findings():
    man = {"experts": [{"routing_stats": {"copied_from": "/home/o/x.npz", "source": {"documents": 3}}},
                       {"manifest": {"gin_config": "RunConfig.data_dir = '/data/hospital'\n"}}]}
    found = audit.manifest_findings(man)
    assert len(found) == 3 and any("copied_from" in f for f in found) and any("data_dir" in f for f in found)
    assert audit.manifest_findings({"gin_config": "RunConfig.data_dir = '<the owner's data directory>'"}) == []
