"""``flexmoe privacy audit``: the attacks of :mod:`flexmoe_jax.privacy.attacks` run on every artifact an
owner publishes, trained-on text against held-out text of the same owner.

Artifacts: the **routing stats** (exact or a private release), the **weights** (the owner's model: the
public expert plus its own, against the public model alone), the **manifests** (what they record).
Attacks: membership of once-seen strings (e-mail addresses, their user parts, names, identifiers) and
of whole documents; reconstruction from a count table (completing strings from their first token,
greedy chains' n-grams found in trained-on against held-out text); canary exposure (planted secrets,
:mod:`flexmoe_jax.privacy.canaries`); the extraction check (:func:`flexmoe_jax.privacy.check.run`).
:func:`verdict` compares with the targets (docs/privacy.md, "The audit").
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from flexmoe_jax.errors import UserError
from flexmoe_jax.privacy import attacks, canaries as canary_lib

MAX_STRINGS = 300  # per kind and class (members, non-members), a seeded sample
MAX_DOCS = 200
DOC_TOKENS = 128
CANDIDATES = 255  # exposure at most log2(256) = 8 bits
CHAIN_STARTS, CHAIN_LEN, NGRAM = 100, 32, 8
AUC_LIMIT = 0.6
# A random rank among 256 gives 8 - E[log2 rank] = 1.44 bits on average; the mean of a few canaries
# varies by ~0.7 bits, so 2 bits above the larger of chance and the weights' figure is a real exposure.
CHANCE_EXPOSURE, CANARY_MARGIN = 1.44, 2.0
HELD_OUT = ("validation", "test")  # the splits no owner trains on: the non-members
MIN_CLASS = 20  # a kind of string is attacked when both classes have at least this many
PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+",
    "name": r"\b[A-Z][a-z]+(?: [A-Z]\.)? [A-Z][a-z]{2,}\b",
    "identifier": r"\b(?=[A-Za-z_]*[0-9_])[A-Za-z_][A-Za-z0-9_]{7,}\b",
}


def candidate_strings(train: Sequence[str], held_out: Sequence[str], seed: int = 0) -> dict:
    """``{kind: (members, non-members)}``: strings in exactly one trained-on document and in no held-out
    one, against strings only in held-out documents; ``email_user`` are the addresses' user parts.
    Kinds with fewer than MIN_CLASS strings on either side are left out."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind, pat in [*PATTERNS.items(), ("email_user", None)]:
        rx = re.compile(pat or PATTERNS["email"])

        def found(texts):
            c = collections.Counter()
            for t in texts:
                c.update({m.split("@")[0] if pat is None else m for m in rx.findall(t)})
            return c

        tr, te = found(train), found(held_out)
        members = sorted(s for s, n in tr.items() if n == 1 and s not in te and len(s) >= 3)
        non = sorted(s for s in te if s not in tr and len(s) >= 3)
        if min(len(members), len(non)) < MIN_CLASS:
            continue
        out[kind] = tuple(sorted(rng.choice(x, size=min(MAX_STRINGS, len(x)), replace=False).tolist())
                          for x in (members, non))
    return out


def manifest_findings(obj, where: str = "manifest") -> list[str]:
    """What a published JSON record gives away of the owner's side: paths on its disk, document or
    token counts of its data, hashes of its data card."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("copied_from", "documents", "data_card_sha256", "data_dir"):
                found.append(f"{where}.{k}")
            found += manifest_findings(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += manifest_findings(v, f"{where}[{i}]")
    elif isinstance(obj, str) and re.search(r"RunConfig\.data_dir\s*=\s*'(/|gs://)", obj):
        found.append(f"{where} (RunConfig.data_dir: a path on the owner's disk)")
    return found


class _Artifacts:
    """What one owner published, located from a run directory or a merged model."""

    def __init__(self, path, expert: str | None, anchor, data_dir):
        from flexmoe_jax import checkpoint, loading, routing

        p = Path(path)
        self.trained = None
        if p.suffix == ".npz" and p.is_file():  # a routing-stats file alone: only the stats are attacked
            self.stats, self.model, self.reference, self.manifests = routing.Stats.load(p), None, None, {}
            self.name, self.task = self.stats.name, self.stats.source.get("task")
        elif _is_merged(p):
            config = checkpoint.load_config(p)
            owners = [n for n in config.names if n != routing.PUBLIC]
            if expert is None and len(owners) != 1:
                raise UserError(f"{p} merges {owners}: name the owner to audit with --expert")
            self.name = expert or owners[0]
            if self.name not in owners:
                raise UserError(f"{p} has no expert {self.name!r} (it has {owners})")
            self.stats = loading.read_routing_stats(p, [self.name]).get(self.name)
            self.model = (p, (routing.PUBLIC, self.name))
            self.reference = (p, (routing.PUBLIC,))
            self.manifests = {"merged manifest": loading.read_manifest(p)}
            entry = next(e for e in self.manifests["merged manifest"]["experts"] if e["name"] == self.name)
            self.task = (entry.get("manifest") or {}).get("task")
        elif (p / "model").is_dir() and (p / "expert").is_dir():
            man = json.loads((p / "expert" / "manifest.json").read_text())
            self.name, self.task = man["name"], man["task"]
            f = p / routing.STATS_FILE
            self.stats = routing.Stats.load(f) if f.exists() else None
            self.model = (p / "model", None)
            anchor = anchor or man.get("anchor")
            if not anchor or not Path(anchor).exists():
                raise UserError(f"the public model {anchor!r} recorded for {p} is not here: pass --anchor")
            self.reference = (Path(anchor), None)
            self.manifests = {"deliverable manifest": man}
            from flexmoe_jax import trained_docs

            self.trained = trained_docs.trained_documents(p, data_dir, self.task)
        else:
            raise UserError(f"{p} is neither an owner's run directory (with model/ and expert/, what "
                            "`flexmoe train-expert --out` writes), a merged model nor a routing-stats .npz")
        if not self.task:
            raise UserError(f"{p} records no task for {self.name!r}: pass --task")


def _model_ll(path, include, seqs: Sequence[Sequence[int]], seq_len: int = DOC_TOKENS, batch: int = 32) -> np.ndarray:
    """Each sequence's summed log-likelihood (after BOS) under the checkpoint (with only ``include``)."""
    from flexmoe_jax.evaluation.scorers import ModelScorer

    scorer = ModelScorer.from_checkpoint(path, include=include, routing="top_k")
    S = min(seq_len, scorer.max_seq_len)
    out = np.zeros(len(seqs))
    for lo in range(0, len(seqs), batch):
        chunk = [list(s)[:S] for s in seqs[lo: lo + batch]]
        b = {k: np.zeros((batch, S), np.int32) for k in ("decoder_input_tokens", "decoder_target_tokens",
                                                          "decoder_positions", "decoder_segment_ids")}
        mask = np.zeros((batch, S), bool)
        for i, s in enumerate(chunk):
            n = len(s)
            b["decoder_target_tokens"][i, :n] = s
            b["decoder_input_tokens"][i, 1:n] = s[: n - 1]
            b["decoder_positions"][i, :n] = np.arange(n)
            b["decoder_segment_ids"][i, :n] = 1
            mask[i, :n] = True
        lp = np.asarray(scorer.logprobs(b), np.float64)
        out[lo: lo + len(chunk)] = (lp * mask).sum(axis=1)[: len(chunk)]
    return out


def audit(path, data_dir, *, expert: str | None = None, anchor=None, task: str | None = None,
          reference_stats=None, canary_file=None, seed: int = 0, extraction: bool = True,
          extraction_docs: int = 50, stats_file=None, weights: bool = True) -> dict:
    """Every attack on every artifact of ``path`` (an owner's run directory, a merged model, or a
    routing-stats file alone), with
    the owner's data in ``data_dir``. ``reference_stats``: the attacker's public-data stats file (the
    stats attacks' likelihood-ratio reference; default the artifact's own public stats, else none).
    ``canary_file``: the canaries planted in the owner's data (:func:`flexmoe_jax.privacy.canaries.save`).
    ``stats_file``: audit this routing-stats file instead of the one published with ``path``;
    ``weights=False`` skips the attacks on the weights (and the extraction check).
    Returns the JSON-ready report (``verdict`` inside)."""
    from flexmoe_jax import data, routing, trained_docs
    from flexmoe_jax.privacy import check

    a = _Artifacts(path, expert, anchor, data_dir)
    if stats_file is not None:
        a.stats = routing.Stats.load(stats_file)
    task = task or a.task
    sp = data.sentencepiece(data_dir)
    enc = lambda texts: [[int(x) for x in sp.encode(t)] for t in texts]  # noqa: E731
    train = trained_docs.split_texts(task, "train", data_dir)
    held = [t for split in HELD_OUT for t in trained_docs.split_texts(task, split, data_dir)]
    if not train or not held:
        raise UserError(f"{task} in {data_dir} needs train and held-out ({', '.join(HELD_OUT)}) documents to audit")
    fed = [train[i] for i in a.trained.indices] if a.trained is not None else train
    rng = np.random.default_rng(seed)
    sample = lambda xs, k: [xs[i] for i in sorted(rng.choice(len(xs), size=min(k, len(xs)), replace=False))]  # noqa
    docs = {"stats": (enc(sample(train, MAX_DOCS)), enc(sample(held, MAX_DOCS))),
            "weights": (enc(sample(fed, MAX_DOCS)), None)}
    docs["weights"] = (docs["weights"][0], docs["stats"][1])
    strings = {"stats": candidate_strings(train, held, seed), "weights": candidate_strings(fed, held, seed)}
    marks = canary_lib.load(canary_file) if canary_file else []
    report = {"artifact": str(path), "expert": a.name, "task": task, "data_dir": str(data_dir),
              "settings": {"max_strings": MAX_STRINGS, "min_class": MIN_CLASS, "max_docs": MAX_DOCS,
                           "doc_tokens": DOC_TOKENS,
                           "candidates": CANDIDATES, "fpr": attacks.FPR, "seed": seed},
              "strings": {k: [len(m), len(n)] for k, (m, n) in strings["stats"].items()},
              "manifest": {k: manifest_findings(v, k) for k, v in a.manifests.items()}, "artifacts": {}}

    def canary_seqs():
        r = np.random.default_rng([seed, 7])
        return [(c, enc([c.text])[0], enc([canary_lib.PREFIX + s for s in canary_lib.secrets(CANDIDATES, r)]))
                for c in marks]

    scorers = {}
    if a.stats is not None:
        ref = reference_stats or _public_stats(path)
        own = attacks.PairModel(a.stats)
        refm = attacks.PairModel(routing.Stats.load(ref) if isinstance(ref, (str, Path)) else ref,
                                 own.vocab_size) if ref is not None else None
        scorers["stats"] = lambda seqs: np.array([own.ratio(s, refm) if refm else own.sequence_ll(s) for s in seqs])
        report["artifacts"]["stats"] = {"release": a.stats.release or {"mechanism": "exact"},
                                        **_reconstruction(own, strings["stats"], docs["stats"], enc)}
        report["artifacts"]["stats"]["membership_min_pair"] = {
            k: attacks.membership([own.min_pair(s) for s in enc(m)], [own.min_pair(s) for s in enc(n)])
            for k, (m, n) in strings["stats"].items() if m and n}
    if weights and a.model is not None:
        scorers["weights"] = lambda seqs: (_model_ll(*a.model, seqs) - _model_ll(*a.reference, seqs))
    cans = canary_seqs()
    for art, score in scorers.items():
        r = report["artifacts"].setdefault(art, {})
        r["membership"] = {k: attacks.membership(score(enc(m)), score(enc(n)))
                           for k, (m, n) in strings[art].items() if m and n}
        mem, non = docs[art]
        per_tok = lambda ds: score([d[:DOC_TOKENS] for d in ds]) / np.array([min(len(d), DOC_TOKENS) for d in ds])  # noqa
        if min(len(mem), len(non)) >= MIN_CLASS:
            r["membership"]["document"] = attacks.membership(per_tok(mem), per_tok(non))
        if cans:
            exp = collections.defaultdict(list)
            for c, true, cands in cans:
                s = score([true, *cands])
                exp[c.repeats].append(attacks.exposure(s[0], s[1:]))
            r["canary_exposure_bits"] = {str(k): round(float(np.mean(v)), 3) for k, v in sorted(exp.items())}
    if extraction and "weights" in scorers:
        res = check.run({a.name: a.model[0]}, data_dir, [task], num_docs=extraction_docs, include=a.model[1],
                        trained_from={task: path} if a.trained is not None else None, progress=False, seed=seed)
        report["artifacts"]["weights"]["extraction"] = {
            split: {k: v for k, v in r.items() if k in ("docs", "extracted", "rate", "mean_best_similarity")}
            for split, r in next(iter(res[a.name].values())).items()}
    report["verdict"] = verdict(report)
    return report


def _is_merged(p: Path) -> bool:
    from flexmoe_jax import checkpoint

    return (p / checkpoint.MARKER_NAME).is_file() and checkpoint.kind(p) == checkpoint.MERGED_KIND


def _public_stats(path):
    """The public expert's stats a merged model carries (None for a run directory)."""
    from flexmoe_jax import loading, routing

    p = Path(path)
    return loading.read_routing_stats(p, [routing.PUBLIC]).get(routing.PUBLIC) if _is_merged(p) else None


def _reconstruction(own: "attacks.PairModel", strings: dict, docs, enc) -> dict:
    """Completion of strings from their first token and greedy chains, trained-on against held-out."""
    comp = {k: {"members": round(attacks.complete(own, enc(m)), 4),
                "nonmembers": round(attacks.complete(own, enc(n)), 4)}
            for k, (m, n) in strings.items() if m and n}
    mem, non = docs
    budget = min(sum(map(len, mem)), sum(map(len, non)))

    def cut(ds):  # equal token budgets, so the two n-gram sets are comparable
        out, n = [], 0
        for d in ds:
            out.append(d[: max(budget - n, 0)])
            n += len(out[-1])
        return out

    starts = np.argsort(-own.counts)[:CHAIN_STARTS]
    chains = attacks.chain_spans(own, [int(t) for t in starts if t > 1], CHAIN_LEN, NGRAM,
                                 {"trained": attacks.ngrams(cut(mem), NGRAM),
                                  "held_out": attacks.ngrams(cut(non), NGRAM)})
    return {"completion": comp, "chains": chains}


def verdict(report: dict) -> dict:
    """Pass/fail of each published statistic against the targets: membership AUC <= AUC_LIMIT,
    reconstruction no better than the held-out control, canary exposure no more than the weights'."""
    out = {}
    st = report["artifacts"].get("stats")
    if st:
        aucs = [m["auc"] for m in (*st["membership"].values(), *st["membership_min_pair"].values())]
        out["stats_membership_auc_max"] = max(aucs, default=None)  # None: too few strings to attack
        out["stats_membership_pass"] = max(aucs, default=0.0) <= AUC_LIMIT
        comp = st["completion"].values()
        out["stats_reconstruction_pass"] = (all(c["members"] <= c["nonmembers"] + 0.02 for c in comp)
                                            and st["chains"]["in_trained"] <= st["chains"]["in_held_out"] + 0.02)
        w = report["artifacts"].get("weights", {}).get("canary_exposure_bits") or {}
        if st.get("canary_exposure_bits"):  # no worse than the weights alone give, or than chance
            out["stats_canary_pass"] = all(v <= max(w.get(k, 0.0), CHANCE_EXPOSURE) + CANARY_MARGIN
                                           for k, v in st["canary_exposure_bits"].items())
    out["manifest_pass"] = not any(report["manifest"].values())
    out["pass"] = all(v for k, v in out.items() if k.endswith("_pass"))
    return out


def markdown(report: dict) -> str:
    """The report as Markdown: one row per artifact and attack."""
    lines = [f"Privacy audit of {report['expert']} ({report['artifact']}), {report['task']}: trained-on vs held-out.",
             "", "| artifact | attack | members / non-members | AUC (± s.e.) | TPR at FPR 0.1 |",
             "|---|---|---|---|---|"]
    for art, r in report["artifacts"].items():
        for tag, key in (("likelihood ratio", "membership"), ("min pair count", "membership_min_pair")):
            for kind, m in (r.get(key) or {}).items():
                lines.append(f"| {art} | {kind}: {tag} | {m['members']} / {m['nonmembers']} | "
                             f"{m['auc']:.3f} ± {m['auc_se']:.3f} | "
                             f"{m['tpr_at_fpr']:.2f} |")
    lines.append("")
    for art, r in report["artifacts"].items():
        if "completion" in r:
            lines.append(f"- {art}, completion from the first token (members vs non-members): " + "; ".join(
                f"{k} {c['members']:.1%} vs {c['nonmembers']:.1%}" for k, c in r["completion"].items()))
            ch = r["chains"]
            lines.append(f"- {art}, greedy chains: {ch['in_trained']:.1%} of their {ch['n']}-grams in trained-on text, "
                         f"{ch['in_held_out']:.1%} in held-out text")
        if "canary_exposure_bits" in r:
            lines.append(f"- {art}, canary exposure (bits, of max {np.log2(CANDIDATES + 1):.0f}; by insertions): "
                         + ", ".join(f"{k}x {v:.2f}" for k, v in r["canary_exposure_bits"].items()))
        if "extraction" in r:
            lines.append(f"- {art}, extraction: " + ", ".join(f"{s} {x['extracted']}/{x['docs']}"
                                                              for s, x in r["extraction"].items()))
    for where, found in report["manifest"].items():
        lines.append(f"- {where}: " + ("records nothing of the owner's side" if not found
                                       else "records " + ", ".join(found)))
    v = report["verdict"]
    lines.append(f"- verdict: {'PASS' if v['pass'] else 'FAIL'} ({', '.join(f'{k} {v[k]}' for k in v if k != 'pass')})")
    return "\n".join(lines)
