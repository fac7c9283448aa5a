"""An owner registered from files of its own (not FlexMix-mini) gets what FlexMix-mini's owners get (issue 14).

The owner's corpus is built from text that is on every Debian machine and is none of FlexMix-mini's
sources: the license texts of ``base-files`` (``/usr/share/common-licenses``), reflowed and cut into
documents of a few paragraphs (about 360 documents, 200 KB). The whole workflow runs through the
command line, each step in its own process as the people involved would run it:

- the model builder pretrains the public dense anchor on the public data and counts the public
  tokens (``flexmoe routing-stats``);
- the owner registers its files (``flexmoe data register``) and trains its expert against the
  anchor (``flexmoe train-expert``, which also writes its routing counts), as does a FlexMix-mini
  owner (humor);
- the experts are merged (``flexmoe merge``, each expert's routing stats carried from its run
  directory) and evaluated on the owner's held-out text (``flexmoe eval --json``).

Checked: the owner's own model beats the public model on its text; the merged model keeps at least
70% of that gain under density routing (nothing published but the weights); opting the owner out
under domain routing is bit-identical to a merge made without it; the privacy audit of the owner's
run (its privately released routing stats, its weights, its manifest; random canaries were planted
1, 4 and 16 times in its files) passes. The gains top-k and domain routing (private stats) keep, and
domain routing's own-expert share, are printed, not checked. Tiny sizes (a 2-layer d=64 model, 150 anchor and
60 expert steps): about two minutes on two CPU cores; every number is deterministic.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

OWNER = "license_texts"  # the registered owner: its task name, expert name and results domain
LICENSES = Path("/usr/share/common-licenses")  # Debian base-files: present on every Debian system
DOC_CHARS = 400  # paragraphs are joined into documents of about this many characters

MODEL = ["ModelConfig.vocab_size=512", "ModelConfig.d_model=64", "ModelConfig.n_heads=4",
         "ModelConfig.mlp_hidden=128", "ModelConfig.n_layers=2", "ModelConfig.max_seq_len=128"]
SHAPE = ["RunConfig.seq_len=64", "RunConfig.batch_size=8", "OptimConfig.warmup_steps=2", "RunConfig.log_every=10"]
ANCHOR_STEPS = 150
EXPERT_STEPS = 60
LR = "OptimConfig.peak_lr=0.01"


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flexmoe_jax.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _ok(proc: subprocess.Popen, what: str) -> str:
    """Wait for ``proc``; its stdout, or a failure showing what it printed."""
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return stdout


def _gin(params) -> list[str]:
    return [a for p in params for a in ("--gin_param", p)]


def license_documents() -> list[str]:
    """The Debian license texts as documents: runs of whole paragraphs of about DOC_CHARS characters,
    each file read once (GPL, LGPL and GFDL are links to versioned files)."""
    if not LICENSES.is_dir():
        pytest.skip(f"{LICENSES} is missing (not a Debian system)")
    docs, seen = [], set()
    for path in sorted(LICENSES.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        # Paragraphs reflowed into one line each (the files are hard-wrapped and indented).
        text = real.read_text(encoding="utf-8")
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
        cur = ""
        for p in paragraphs:
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) >= DOC_CHARS:
                docs.append(cur)
                cur = ""
        if cur:
            docs.append(cur)
    return docs


@pytest.fixture(scope="module")
def world(small_data_dir, tmp_path_factory):
    from flexmoe_jax import demo, routing

    root = tmp_path_factory.mktemp("registered_owner")
    timing = {}
    t0 = time.perf_counter()

    def lap(what):
        nonlocal t0
        timing[what] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()

    # Data directories of our own (hard links into the session's), so registering the owner leaves the
    # shared fixture as it was: the model builder's (public + humor), where the owner registers its files
    # and which evaluation reads, and the humor owner's (its own machine).
    data_dir = demo.owner_data_dir(small_data_dir, "humor", root / "data")
    humor_dir = demo.owner_data_dir(small_data_dir, "humor", root / "humor_data")
    corpus = root / "owner_files"
    corpus.mkdir()
    from flexmoe_jax.privacy import canaries

    marks = canaries.make(per_repeat=4, seed=1)
    docs = canaries.plant(license_documents(), marks, seed=1)
    canary_file = canaries.save(root / "canaries.json", marks)
    for i, text in enumerate(docs):
        (corpus / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    lap("setup")

    # The model builder pretrains the public anchor and counts the public tokens; meanwhile the owner
    # registers its files with the anchor's tokenizer (the data directory's).
    anchor_run, public_stats = root / "anchor", root / "public_stats.npz"
    pretrain = _start("train", "--gin_file", "phase/pretrain.gin", "--workdir", anchor_run,
                      *_gin(MODEL + SHAPE + [f'RunConfig.data_dir="{data_dir}"', f"RunConfig.steps={ANCHOR_STEPS}",
                                             f"RunConfig.checkpoint_every={ANCHOR_STEPS}", LR]))
    _ok(_start("routing-stats", "--data_dir", data_dir, "--task", "flexmix_mini.public", "--name", "public",
               "--out", public_stats, "--routing_seed", 0), "routing-stats public")
    out = _ok(_start("data", "register", "--name", OWNER, "--files", f"{corpus}/*.txt", "--data_dir", data_dir,
                     "--no_progress"), "data register")
    manifest = json.loads((Path(data_dir) / "owners" / f"{OWNER}.json").read_text())
    _ok(pretrain, "pretraining the anchor")
    anchor = anchor_run / "model"
    lap("anchor, public stats, register")

    # Each owner trains its expert in its own process on its own machine's data, the two at once.
    runs = {OWNER: root / "experts" / OWNER, "humor": root / "experts" / "humor"}
    setup = {OWNER: (OWNER, data_dir), "humor": ("flexmix_mini.humor", humor_dir)}
    procs = {name: _start("train-expert", "--anchor", anchor, "--task", setup[name][0], "--out", run,
                          "--data_dir", setup[name][1], "--routing_seed", i,
                          *_gin(SHAPE + [f"RunConfig.steps={EXPERT_STEPS}",
                                         f"RunConfig.checkpoint_every={EXPERT_STEPS}", LR]))
             for i, (name, run) in enumerate(runs.items())}
    for name, p in procs.items():
        _ok(p, f"train-expert {name}")
        assert (runs[name] / routing.STATS_FILE).is_file(), f"train-expert {name} wrote no routing stats"
    lap("experts")

    # The merges, with the owner and without it (for the opt-out check); each expert's routing stats
    # come from its run directory, the public ones from the builder's file.
    merged, without = root / "merged", root / "merged_without_owner"
    procs = {dst: _start("merge", "--anchor", anchor, "--expert", *experts, "--out", dst,
                         "--routing_stats", f"public={public_stats}")
             for dst, experts in ((merged, [runs[OWNER], runs["humor"]]), (without, [runs["humor"]]))}
    for dst, p in procs.items():
        _ok(p, f"merge -> {dst.name}")
    lap("merge")

    # Evaluation on the owner's held-out text: public, the owner's own model, merged (top_k, domain).
    # Routing is named explicitly: a merged model carrying every expert's stats defaults to domain.
    results = root / "results.json"
    common = ["--data_dir", data_dir, "--tasks", OWNER, "--mc_items", "0", "--json", results]
    _ok(_start("eval", "--ckpt", anchor, runs[OWNER], merged, "--name", "public", "own", "merged_top_k",
               "--routing", "top_k", *common), "eval --routing top_k")
    _ok(_start("eval", "--ckpt", merged, "--name", "merged_domain", "--routing", "domain", *common),
        "eval --routing domain")
    _ok(_start("eval", "--ckpt", merged, "--name", "merged_density", "--routing", "density", *common),
        "eval --routing density")
    lap("eval")
    return {"root": root, "data_dir": str(data_dir), "docs": docs, "canaries": canary_file,
            "register_stdout": out, "manifest": manifest,
            "anchor": anchor, "runs": runs, "merged": merged, "without": without,
            "results": json.loads(results.read_text()), "timing": timing}


@pytest.mark.slow
def test_registered_owner_keeps_its_gain_after_merging(world):
    from flexmoe_jax import eval as eval_lib, loading

    man = world["manifest"]
    assert man["task"] == OWNER and man["read"]["documents"] == len(world["docs"])
    assert all(man["splits"][s]["docs"] > 0 for s in ("train", "validation", "test")), man["splits"]
    assert f"registered '{OWNER}'" in world["register_stdout"]
    # The merged model carries the routing counts of every expert, the owner's from its run directory.
    names = ("public", OWNER, "humor")
    assert loading.read_manifest(world["merged"])["experts"][1]["name"] == OWNER
    stats = eval_lib.checkpoint_routing_stats(world["merged"], names)
    assert sorted(stats) == sorted(names) and stats[OWNER].source["task"] == OWNER

    r = {m: world["results"][m][OWNER]["bpb"] for m in ("public", "own", "merged_top_k", "merged_domain",
                                                          "merged_density")}
    gain = r["public"] - r["own"]
    kept = {mode: (r["public"] - r[f"merged_{mode}"]) / gain for mode in ("domain", "top_k", "density")}

    config, params = eval_lib.load_model(world["merged"])
    shares = eval_lib.routing(config, params, world["data_dir"], tasks=[OWNER], mode="domain",
                              routing_stats=stats)[OWNER]
    print(f"\n{OWNER}: {len(world['docs'])} documents, splits {man['splits']}")
    print(f"bpb on {OWNER} test: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()))
    print(f"gain kept: density routing {kept['density']:.1%}, domain routing (private stats) {kept['domain']:.1%}, "
          f"top_k routing {kept['top_k']:.1%} (the last two not asserted); "
          f"own share under domain routing {shares['own']:.1%} of {shares['tokens']} tokens ({shares['picked']})")
    print(f"timing (s): {world['timing']}")
    assert gain > 0, f"the owner's expert does not beat the public model on its own text: {r}"
    assert kept["density"] >= 0.7, f"density routing keeps {kept['density']:.1%} of the owner's gain: {r}"


@pytest.mark.slow
def test_privacy_audit_of_the_registered_owner(world, tmp_path):
    """`flexmoe privacy audit` of the owner's run: its private stats, weights and manifest pass; the
    canaries' exposure through the weights (the paper's own) is printed."""
    from flexmoe_jax import routing

    ref = routing.fit(world["data_dir"], "flexmix_mini.public", "public", seq_len=64).save(tmp_path / "public.npz")
    out = tmp_path / "audit.json"
    proc = _start("privacy", "audit", world["runs"][OWNER], "--data", world["data_dir"], "--canaries",
                  world["canaries"], "--reference_stats", ref, "--json", out)
    stdout, stderr = proc.communicate(timeout=900)
    print(stdout)
    assert proc.returncode in (0, 1) and out.exists(), stderr[-3000:]
    report = json.loads(out.read_text())
    v = report["verdict"]
    assert v["manifest_pass"], report["manifest"]  # no owner path, no data-card hash in the deliverable
    assert v["stats_membership_pass"] and v["stats_reconstruction_pass"] and v["stats_canary_pass"], v
    stats, weights = report["artifacts"]["stats"], report["artifacts"]["weights"]
    assert stats["release"]["epsilon"] == 1.0 and set(weights["canary_exposure_bits"]) == {"1", "4", "16"}
    assert "extraction" in weights


def test_registered_owner_opt_out_is_exact(world):
    """Excluding the owner under domain routing is the merge made without it, bit for bit."""
    from flexmoe_jax import data, eval as eval_lib

    data.register_tasks(world["data_dir"])
    batch = next(iter(data.batches(OWNER, "test", 8, 64, world["data_dir"], seed=0)))
    batch = {k: np.asarray(v) for k, v in batch.items()}
    got = eval_lib.ModelScorer.from_checkpoint(world["merged"], exclude=[OWNER], routing="domain").logprobs(batch)
    want = eval_lib.ModelScorer.from_checkpoint(world["without"], routing="domain").logprobs(batch)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    full = eval_lib.ModelScorer.from_checkpoint(world["merged"], routing="domain").logprobs(batch)
    assert not np.array_equal(np.asarray(full), np.asarray(want))  # the owner's expert did take part


@pytest.mark.slow
def test_notebook_scores_the_registered_owners_domain(world, demo_env, monkeypatch):
    """notebooks/evaluate.ipynb takes the domains to score from the merged model: the registered owner's
    own task appears in its perplexity table and prompts its generation, beside humor and public."""
    from test_notebook import run_notebook

    _, text = run_notebook(world["root"], demo_env, monkeypatch)
    assert f"| model | {OWNER} | humor | public |" in text and f"| without {OWNER} |" in text
    assert text.count("experts: ") >= 2
