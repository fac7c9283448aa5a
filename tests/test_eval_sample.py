"""The evaluation sample and its bootstrap intervals, on real (small) FlexMix-mini data."""

import math
from collections import Counter

import numpy as np
import pytest

from flexmoe_jax import eval as ev, expert, model
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.data import eval_sample as sample
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation import bootstrap

SEQ, BS = 64, 8


@pytest.fixture(scope="module")
def anchor():
    """A small random dense model (the same shape as test_eval's)."""
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=SEQ, init_std=0.1)
    return cfg, model.init(cfg, 0)


def _segments(rows):
    """Every packed segment as (targets, inputs) tuples."""
    out = []
    for r in range(len(rows["decoder_target_tokens"])):
        seg = rows["decoder_segment_ids"][r]
        for s in set(seg[seg > 0].tolist()):
            m = seg == s
            out.append((tuple(rows["decoder_target_tokens"][r][m]), tuple(rows["decoder_input_tokens"][r][m])))
    return Counter(out)


def test_whole_split_is_every_document_packed_as_seqio_packs(data_dir):
    from flexmoe_jax import data
    from flexmoe_jax.data import packing, tasks

    for task in ("flexmix_mini.humor", "flexmix_mini.public"):
        s = sample.draw(data_dir, task, "test", SEQ)
        size = s.size()
        stats = data.split_stats(task, "test", data_dir)
        assert (size["docs"], size["tokens"], size["bytes"]) == (stats["docs"], stats["tokens"], stats["bytes"])
        assert size["whole_split"] and size["split_docs"] == stats["docs"]
        want = Counter()
        for t in tasks._tasks_and_rates(task, data_dir)[0]:
            want += _segments(packing.packed_rows(t, "test", SEQ, data_dir))
        assert _segments(s.rows) == want  # same tokens, same pieces, same BOS-shifted inputs as seqio
        assert int(s.rows["decoder_loss_weights"].sum()) == size["tokens"]
        # doc_of covers exactly the scored tokens, each document's token count
        np.testing.assert_array_equal(np.bincount(s.doc_of[s.doc_of >= 0], minlength=s.num_docs), s.doc_tokens)


def test_budgeted_sample_is_seeded_spread_over_the_split_and_proportional(data_dir):
    # the train split: the small data's test split has two documents per source
    whole = sample.draw(data_dir, "flexmix_mini.public", "train", SEQ)
    budget = whole.split_tokens // 4
    a = sample.draw(data_dir, "flexmix_mini.public", "train", SEQ, max_tokens=budget, seed=0)
    b = sample.draw(data_dir, "flexmix_mini.public", "train", SEQ, max_tokens=budget, seed=0)
    c = sample.draw(data_dir, "flexmix_mini.public", "train", SEQ, max_tokens=budget, seed=1)
    assert a.texts == b.texts and a.texts != c.texts
    assert budget <= a.doc_tokens.sum() < budget + len(a.sources) * whole.doc_tokens.max()
    for k, src in enumerate(a.sources):
        mine = a.doc_index[a.doc_source == k]
        n_src = int(np.sum(whole.doc_source == k))
        assert len(mine) > 0
        assert sorted(mine.tolist()) != list(range(len(mine)))  # not the first documents in storage order
        assert mine.max() >= n_src // 2  # reaches into the second half of the split
        share = whole.doc_tokens[whole.doc_source == k].sum() / whole.split_tokens
        got = a.doc_tokens[a.doc_source == k].sum()
        assert got >= share * budget and got - share * budget <= whole.doc_tokens[whole.doc_source == k].max()
    with pytest.raises(ValueError, match="max_tokens"):
        sample.draw(data_dir, "flexmix_mini.public", "test", SEQ, max_tokens=0)


def _doc_nll_direct(cfg, params, ids, seq_len):
    """A document's summed NLL scored alone, piece by piece, each piece with BOS in front."""
    total = 0.0
    for lo in range(0, len(ids), seq_len):
        piece = ids[lo: lo + seq_len]
        inp = np.array([[0] + piece[:-1]], np.int32)
        logits = np.asarray(model.forward(cfg, params, inp), np.float64)[0]
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total -= float(np.sum(logits[np.arange(len(piece)), piece] - lse))
    return total


def test_perplexity_on_a_sample_scores_whole_documents(data_dir, anchor):
    from flexmoe_jax import data

    scorer = ev.ModelScorer(*anchor, name="anchor")
    whole = sample.draw(data_dir, "flexmix_mini.humor", "train", SEQ)
    r = ev.perplexity(scorer, "flexmix_mini.humor", data_dir, "train", SEQ, BS, max_tokens=whole.split_tokens // 3)
    s = sample.draw(data_dir, "flexmix_mini.humor", "train", SEQ, max_tokens=whole.split_tokens // 3)
    assert r["docs"] == s.num_docs < whole.num_docs and r["sample"] == s.size()
    assert r["tokens"] == s.doc_tokens.sum() and r["bytes"] == s.doc_bytes.sum()
    assert sum(r["doc_nll"]) == pytest.approx(r["nll"] * r["tokens"], rel=1e-9)
    assert r["bpb"] == pytest.approx(sum(r["doc_nll"]) / math.log(2) / r["bytes"], rel=1e-9)
    lo, hi = r["bpb_ci"]
    assert lo < r["bpb"] < hi
    sp = data.sentencepiece(data_dir)
    for d in (0, s.num_docs - 1):  # a document's score does not depend on what it was packed with
        ids = list(sp.encode(s.texts[d])) + [1]
        assert r["doc_nll"][d] == pytest.approx(_doc_nll_direct(*anchor, ids, SEQ), rel=1e-4)


def test_bootstrap_intervals():
    strata = np.array([0] * 5 + [1] * 20)
    idx = bootstrap.indices(strata, 200, seed="x")
    assert idx.shape == (200, 25)
    np.testing.assert_array_equal((strata[idx] == 0).sum(axis=1), 5)  # strata keep their sizes
    np.testing.assert_array_equal(idx, bootstrap.indices(strata, 200, seed="x"))
    nbytes = np.arange(1, 26) * 100
    flat = nbytes * 2 * math.log(2)  # every document at exactly 2 bits per byte
    np.testing.assert_allclose(bootstrap.bpb_replicates(flat, nbytes, idx), 2.0)
    rng = np.random.default_rng(0)
    noisy = flat * rng.uniform(0.5, 1.5, 25)
    reps = bootstrap.bpb_replicates(noisy, nbytes, idx)
    lo, hi = bootstrap.interval(reps)
    assert lo < noisy.sum() / nbytes.sum() / math.log(2) < hi and hi - lo > 0.05
    paired = bootstrap.Paired({"a": (nbytes, strata)}, n_boot=200)
    same = paired.bpb({"a": noisy})["a"]
    assert bootstrap.relative_difference(same, same) == {"ci": [0.0, 0.0], "excludes_zero": False}
    better = paired.bpb({"a": noisy * 0.95})["a"]  # 5% better on every document: tight, paired
    d = bootstrap.relative_difference(better, same)
    assert d["excludes_zero"] and d["ci"] == pytest.approx([-0.05, -0.05], abs=1e-9)
    with pytest.raises(ValueError, match="same sample"):
        paired.bpb({"a": noisy[:-1]})


def test_evaluate_average_interval_and_per_doc_scores_stay_out_of_results_json(data_dir, anchor, tmp_path):
    import json

    out = tmp_path / "r.json"
    got = ev.main_eval({"anchor": anchor}, data_dir, seq_len=SEQ, batch_size=BS, mc_items_per_domain=0,
                       json_out=out, log=None, progress=False)
    written = json.loads(out.read_text())["anchor"]
    assert "doc_nll" not in written["humor"] and "doc_nll" in got["anchor"]["humor"]
    docs = json.loads(ev.docs_path(out).read_text())["anchor"]
    assert docs["humor"]["doc_nll"] == got["anchor"]["humor"]["doc_nll"]
    assert written["humor"]["sample"]["docs"] == len(docs["humor"]["doc_nll"])
    lo, hi = written["average"]["bpb_ci"]
    assert lo < written["average"]["bpb"] < hi


def test_routing_uses_the_sample_and_shares_sum_to_top_k(data_dir, anchor):
    cfg, params = expert.upcycle(*anchor, "humor")
    merged_cfg = cfg.replace(num_experts=2, top_k=1)
    s = sample.draw(data_dir, "flexmix_mini.humor", "train", SEQ, max_tokens=2000)
    r = ev.routing(merged_cfg, params, data_dir, ["humor", "public"], "train", seq_len=SEQ, batch_size=BS,
                   max_tokens=2000)
    assert r["humor"]["tokens"] == s.doc_tokens.sum()
    for dom in ("humor", "public"):
        assert sum(r[dom]["picked"].values()) == pytest.approx(1.0)  # top-1: each token picks one expert
    assert r["humor"]["own"] == r["humor"]["picked"]["humor"]


def test_mc_items_come_from_the_sampled_documents(data_dir):
    whole = sample.draw(data_dir, "flexmix_mini.humor", "train", ev.DEFAULT_SEQ_LEN)
    s = sample.draw(data_dir, "flexmix_mini.humor", "train", ev.DEFAULT_SEQ_LEN, max_tokens=whole.split_tokens // 2)
    items = ev.mc_items(data_dir, "flexmix_mini.humor", "train", n_items=6, max_tokens=whole.split_tokens // 2)
    assert items
    for it in items:
        assert it.context.strip() and any(t.startswith(it.context[:20]) for t in s.texts)


def test_per_document_cap_keeps_every_document_and_scores_a_window_of_whole_lines(data_dir):
    from flexmoe_jax import data
    from flexmoe_jax.data.pipeline import read_split_texts

    task = "flexmix_mini.humor"
    whole = sample.draw(data_dir, task, "train", SEQ)
    cap = int(np.percentile(whole.doc_tokens, 70))  # about 30% of the documents are cut
    a = sample.draw(data_dir, task, "train", SEQ, max_doc_tokens=cap)
    assert a is sample.draw(data_dir, task, "train", SEQ, max_doc_tokens=cap)  # cached: the same for every model
    assert a.num_docs == whole.num_docs and list(a.doc_index) == list(whole.doc_index)
    cut = a.doc_tokens != whole.doc_tokens
    assert cut.sum() >= 3 and a.docs_windowed == cut.sum() and a.size()["max_doc_tokens"] == cap
    assert not cut[whole.doc_tokens <= cap].any()
    assert a.doc_tokens.sum() < whole.doc_tokens.sum()
    originals = read_split_texts(data_dir, "flexmix_mini", "humor", "train")
    sp = data.sentencepiece(data_dir)
    for d in range(a.num_docs):
        doc, part = originals[a.doc_index[d]], a.texts[d]
        assert a.doc_bytes[d] == len(part.encode("utf-8"))
        if not cut[d]:
            assert part == doc and a.doc_tokens[d] == whole.doc_tokens[d]
            continue
        at = doc.find(part)
        assert at >= 0 and len(part) < len(doc)
        assert at == 0 or doc[at - 1] == "\n"  # starts at a line start ...
        assert part.endswith("\n") or at + len(part) == len(doc)  # ... and ends at a line end
        ends = at + len(part) == len(doc)
        assert a.doc_tokens[d] == len(sp.encode(part)) + ends  # EOS only where the window reaches the end
    np.testing.assert_array_equal(np.bincount(a.doc_of[a.doc_of >= 0], minlength=a.num_docs), a.doc_tokens)
    # windows sit at seeded places: another seed moves some of them
    b = sample.draw(data_dir, task, "train", SEQ, seed=1, max_doc_tokens=cap)
    assert sorted(b.texts) != sorted(a.texts)
    with pytest.raises(UserError, match="max_doc_tokens"):
        sample.draw(data_dir, task, "train", SEQ, max_doc_tokens=1)


def test_evaluation_counts_routing_in_its_own_passes_as_routing_alone_does(data_dir, anchor):
    cfg, params = expert.upcycle(*anchor, "humor")
    merged_cfg = cfg.replace(num_experts=2, top_k=1)
    groups = {"humor": ["humor"], "public": ["public", "humor"]}
    kw = dict(seq_len=SEQ, batch_size=BS, max_tokens=2000, max_doc_tokens=100)
    got = ev.evaluate(ev.ModelScorer(merged_cfg, params), data_dir, ["humor", "public"], "train",
                      mc_items_per_domain=0, progress=False, routing_groups=groups, **kw)
    alone = ev.routing(merged_cfg, params, data_dir, ["humor", "public"], "train", groups=groups, **kw)
    for dom in ("humor", "public"):
        assert got[dom]["routing"] == alone[dom]
        assert got[dom]["routing"]["tokens"] == got[dom]["tokens"]
    assert alone["public"]["group"] == pytest.approx(1.0)  # both experts form public's group
    dense = ev.evaluate(ev.ModelScorer(*anchor), data_dir, ["humor"], "train", mc_items_per_domain=0,
                        progress=False, **kw)
    assert "routing" not in dense["humor"]
