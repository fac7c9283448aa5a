"""Evaluation on real (small) FlexMix-mini data: bpb/ppl, the MC suite, soup, BTM, opt-out, reporting.

Models are untrained (``model.init`` / ``expert.upcycle`` plus noise standing in for training):
what is tested is that each number is computed as documented, not that it is good.
"""

import json
import math

import jax
import numpy as np
import pytest

from flexmoe_jax import checkpoint, eval as ev, expert, model
from flexmoe_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=64, init_std=0.1)
SEQ, BS = 64, 8


@pytest.fixture(scope="module")
def anchor():
    return CFG, model.init(CFG, 0)


def owner(anchor, name, seed, moved=True):
    """An owner's 2-expert model: the upcycled anchor with slot 1 (and its router row) moved."""
    cfg, params = expert.upcycle(*anchor, name)
    if not moved:
        return cfg, params
    rng = np.random.default_rng(seed)
    moe = dict(params["layers"]["moe"])
    for k in ("gate", "up", "down", "router"):
        w = np.array(moe[k])
        w[:, 1] += (0.1 * rng.standard_normal(w[:, 1].shape)).astype(w.dtype)
        moe[k] = w
    return cfg, {**params, "layers": {**params["layers"], "moe": moe}}


def rows(data_dir, n=1):
    from flexmoe_jax import data

    return [b for _, b in zip(range(n), data.eval_batches("flexmix_mini.public", "test", BS, SEQ, data_dir))]


def direct_logprobs(cfg, params, batch):
    logits = np.asarray(model.forward(cfg, params, batch["decoder_input_tokens"],
                                      positions=batch["decoder_positions"], segment_ids=batch["decoder_segment_ids"]),
                        np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    tgt = np.take_along_axis(logits, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    return tgt - lse


def test_bpb_and_ppl_equal_a_direct_computation(data_dir, anchor):
    from flexmoe_jax import data

    scorer = ev.ModelScorer(*anchor, name="anchor")
    res = ev.evaluate(scorer, data_dir, split="test", seq_len=SEQ, batch_size=BS, mc_items_per_domain=0,
                      progress=False)
    assert set(res) == {"humor", "public", "average"}
    assert res["average"]["domains"] == ["humor"]
    json.dumps(res)  # JSON-ready
    for dom, task in (("humor", "flexmix_mini.humor"), ("public", "flexmix_mini.public")):
        nll, n = 0.0, 0
        for b in data.eval_batches(task, "test", BS, SEQ, data_dir):
            w = b["decoder_loss_weights"]
            nll -= float(np.sum(direct_logprobs(*anchor, b) * w))
            n += int(w.sum())
        stats = data.split_stats(task, "test", data_dir)
        assert n == stats["tokens"] == res[dom]["tokens"]  # every token exactly once
        assert res[dom]["nll"] == pytest.approx(nll / n, rel=1e-5)
        assert res[dom]["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        assert res[dom]["bpb"] == pytest.approx(nll / math.log(2) / stats["bytes"], rel=1e-5)
    assert res["average"]["bpb"] == res["humor"]["bpb"]
    # An untrained model is near uniform over the vocabulary: a sanity bound on the scale.
    assert abs(res["public"]["nll"] - math.log(CFG.vocab_size)) < 1.0


def test_soup_of_identical_experts_is_the_anchor_and_soup_averages_ffns(anchor, data_dir):
    a, b = owner(anchor, "a", 0, moved=False), owner(anchor, "b", 1, moved=False)
    cfg, params = ev.soup([anchor, a, b])
    assert cfg == anchor[0]
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(anchor[1])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    batch = rows(data_dir)[0]
    np.testing.assert_allclose(ev.soup_scorer(anchor, [a, b]).token_logprobs(batch),
                               ev.ModelScorer(*anchor).token_logprobs(batch), atol=1e-5)
    # Moved experts: the soup FFN is the mean of the public FFN and each owner's slot-1 FFN.
    a, b = owner(anchor, "a", 0), owner(anchor, "b", 1)
    _, params = ev.soup([anchor, a, b])
    want = (np.asarray(anchor[1]["layers"]["mlp"]["gate"]) + np.asarray(a[1]["layers"]["moe"]["gate"])[:, 1]
            + np.asarray(b[1]["layers"]["moe"]["gate"])[:, 1]) / 3
    np.testing.assert_allclose(np.asarray(params["layers"]["mlp"]["gate"]), want, rtol=1e-5, atol=1e-7)
    _, owners_only = ev.soup([a, b])
    assert not np.allclose(owners_only["layers"]["mlp"]["gate"], params["layers"]["mlp"]["gate"])
    with pytest.raises(ValueError, match="2-expert"):
        ev.soup([(CFG.replace(num_experts=3, top_k=2), model.init(CFG.replace(num_experts=3, top_k=2), 1))])


def test_btm_single_member_causality_and_bayes_identity(anchor, data_dir):
    members = [ev.ModelScorer(*anchor), ev.ModelScorer(*owner(anchor, "a", 0)), ev.ModelScorer(*owner(anchor, "b", 1))]
    batch = rows(data_dir)[0]
    one = ev.BTMScorer(members[1:2])
    np.testing.assert_array_equal(one.token_logprobs(batch), members[1].token_logprobs(batch))

    btm = ev.BTMScorer(members)
    base = btm.token_logprobs(batch)
    # Bayes: a segment's summed ensemble log-likelihood is log mean_m p_m(segment).
    lps = np.stack([m.token_logprobs(batch) for m in members]).astype(np.float64)
    segs = batch["decoder_segment_ids"]
    for r in range(2):
        for s in np.unique(segs[r][segs[r] > 0]):
            sel = segs[r] == s
            want = np.logaddexp.reduce(lps[:, r, sel].sum(-1)) - math.log(3)
            assert base[r, sel].sum() == pytest.approx(want, abs=1e-3)
    # Causal: changing token j (target j-1, input j) never changes a score before j-1.
    row = 0
    j = int(np.nonzero(segs[row] > 0)[0][-1]) - 3
    changed = {k: v.copy() for k, v in batch.items()}
    new = (int(batch["decoder_target_tokens"][row, j - 1]) + 7) % CFG.vocab_size
    changed["decoder_target_tokens"][row, j - 1] = new
    changed["decoder_input_tokens"][row, j] = new
    after = btm.token_logprobs(changed)
    np.testing.assert_allclose(after[row, : j - 1], base[row, : j - 1], atol=1e-6)
    np.testing.assert_allclose(after[1:], base[1:], atol=1e-6)
    assert not np.allclose(after[row, j - 1:], base[row, j - 1:])
    # Top-1: each token after a segment's first (where the prior ties) is scored by one member alone,
    # the one that best explains the segment so far.
    top1 = ev.BTMScorer(members, top_k=1).token_logprobs(batch)
    first = np.concatenate([np.ones_like(segs[:, :1], bool), segs[:, 1:] != segs[:, :-1]], axis=1)
    later = (segs > 0) & ~first
    r, t = np.nonzero(later)
    ctx = np.stack([np.array([lps[m, rr, :tt][segs[rr, :tt] == segs[rr, tt]].sum() for rr, tt in zip(r, t)])
                    for m in range(3)])
    np.testing.assert_allclose(top1[r, t], lps[np.argmax(ctx, 0), r, t], atol=1e-4)
    # The paper's form with one member is that member; with every member and T = 1 it is the
    # posterior form on each segment's first token (both uniform there).
    np.testing.assert_array_equal(ev.BTMScorer(members[1:2], temperature=0.1, mean=True).token_logprobs(batch),
                                  members[1].token_logprobs(batch))
    first_tok = np.nonzero(first & (segs > 0))
    np.testing.assert_allclose(ev.BTMScorer(members, temperature=1.0, mean=True).token_logprobs(batch)[first_tok],
                               base[first_tok], atol=1e-6)
    # The paper's form: weights softmax(-mean NLL of the context / T) over the top-2, renormalized.
    paper = ev.BTMScorer(members, top_k=2, temperature=0.5, mean=True).token_logprobs(batch)
    n = np.array([((segs[rr, :tt] == segs[rr, tt])).sum() for rr, tt in zip(r, t)])
    logits = ctx / n / 0.5
    want = []
    for i in range(len(r)):
        keep = np.argsort(-logits[:, i])[:2]
        w = np.exp(logits[keep, i] - logits[keep, i].max())
        want.append(np.log(np.sum(w / w.sum() * np.exp(lps[keep, r[i], t[i]]))))
    np.testing.assert_allclose(paper[r, t], want, atol=1e-4)


def test_btm_input_form_weighs_members_once_by_the_prompt(anchor, data_dir):
    """The paper's BTM (``context="input"``): a token's weights come from the segment's first N tokens
    before it (so every token after the prefix uses the whole prefix and nothing after it), or from
    the row's prompt when the batch marks one (a multiple-choice question)."""
    members = [ev.ModelScorer(*anchor), ev.ModelScorer(*owner(anchor, "a", 0)), ev.ModelScorer(*owner(anchor, "b", 1))]
    batch = rows(data_dir)[0]
    n_ctx, temp = 8, 0.5
    btm = ev.BTMScorer(members, top_k=2, temperature=temp, mean=True, context="input", context_tokens=n_ctx)
    got = btm.token_logprobs(batch)
    lps = np.stack([m.token_logprobs(batch) for m in members]).astype(np.float64)
    segs, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
    checked = 0
    for r in range(segs.shape[0]):
        for t in np.nonzero(segs[r] > 0)[0]:
            ctx = (segs[r] == segs[r, t]) & (np.arange(segs.shape[1]) < t) & (pos[r] < n_ctx)
            n = ctx.sum()
            logits = lps[:, r, ctx].sum(-1) / max(n, 1) / temp
            kth = np.sort(logits)[-2]
            keep = logits >= kth - 1e-9
            w = np.where(keep, np.exp(logits - logits.max()), 0.0)
            want = np.log(np.sum(w / w.sum() * np.exp(lps[:, r, t])))
            assert got[r, t] == pytest.approx(want, abs=1e-4), (r, t)
            checked += int(pos[r, t] > n_ctx)
    assert checked > 20  # tokens past the prefix, whose weights are frozen
    # Past the prefix nothing but the prefix moves the weights: changing a later token changes only its own score.
    r = 0
    j = int(np.nonzero((segs[r] == segs[r, 0]) & (pos[r] > n_ctx + 2))[0][0])
    changed = {k: v.copy() for k, v in batch.items()}
    changed["decoder_target_tokens"][r, j] = (int(batch["decoder_target_tokens"][r, j]) + 7) % CFG.vocab_size
    after = btm.token_logprobs(changed)
    same = np.ones_like(got, bool)
    same[r, j] = False
    np.testing.assert_allclose(after[same], got[same], atol=1e-5)
    # The segment form, on the same batch, differs after the prefix (its weights keep moving).
    seg_form = ev.BTMScorer(members, top_k=2, temperature=temp, mean=True).token_logprobs(batch)
    assert not np.allclose(seg_form[pos > n_ctx], got[pos > n_ctx], atol=1e-4)
    # A prompt mask replaces the first-N rule: a mask of the first N positions gives the same scores.
    masked = {**batch, ev.PROMPT_MASK: (pos < n_ctx).astype(np.int32)}
    np.testing.assert_allclose(ev.BTMScorer(members, top_k=2, temperature=temp, mean=True, context="input",
                                            context_tokens=1).token_logprobs(masked), got, atol=1e-6)
    with pytest.raises(ValueError, match="context must be one of"):
        ev.BTMScorer(members, context="document")
    with pytest.raises(ValueError, match="context_tokens"):
        ev.BTMScorer(members, context="input", context_tokens=0)


def test_input_soup_averages_weights_per_piece_from_its_prefix(anchor, data_dir):
    """The per-input weighted soup: after each piece's first N tokens, its tokens are scored by the soup
    whose weights are softmax(-mean NLL of those N tokens / T) over the members (checked against
    building that soup with ``soup(weights=...)`` and scoring the piece alone); the N tokens
    themselves by the uniform soup."""
    from flexmoe_jax.evaluation.input_soup import InputSoupScorer

    cfg, params = anchor
    rng = np.random.default_rng(3)
    models = [anchor] + [(cfg, jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(
        np.float32), params)) for _ in range(2)]
    members = [ev.ModelScorer(*m) for m in models]
    batch = rows(data_dir)[0]
    n_ctx, temp = 8, 0.5
    scorer = InputSoupScorer(models, members, temperature=temp, context_tokens=n_ctx, rows_per_call=4)
    got = scorer.token_logprobs(batch)
    uniform = ev.ModelScorer(*ev.soup(models)).token_logprobs(batch)
    lps = np.stack([m.token_logprobs(batch) for m in members]).astype(np.float64)
    segs, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
    np.testing.assert_allclose(got[pos < n_ctx], uniform[pos < n_ctx], atol=1e-6)
    checked = 0
    for r in range(2):
        for sid in np.unique(segs[r][segs[r] > 0]):
            at = np.nonzero(segs[r] == sid)[0]
            prefix = at[pos[r, at] < n_ctx]
            later = at[pos[r, at] >= n_ctx]
            if not later.size:
                continue
            logits = lps[:, r, prefix].mean(-1) / temp
            w = np.exp(logits - logits.max())
            alone = {k: np.zeros((1, SEQ), np.int32) for k in batch if k != "decoder_loss_weights"}
            for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions"):
                alone[k][0, :len(at)] = batch[k][r, at]
            alone["decoder_segment_ids"][0, :len(at)] = 1
            want = ev.ModelScorer(*ev.soup(models, list(w / w.sum()))).token_logprobs(alone)[0, :len(at)]
            np.testing.assert_allclose(got[r, later], want[pos[r, at] >= n_ctx], atol=2e-4)
            checked += len(later)
    assert checked > 20
    assert not np.allclose(got[pos >= n_ctx], uniform[pos >= n_ctx], atol=1e-3)  # the weights did something


def test_mc_rows_mark_the_question_as_the_prompt():
    class Pieces:  # a tokenizer of one id per character
        def encode(self, text):
            return [ord(c) % 500 + 3 for c in text]

    item = ev.MCItem("d", "d", 0, "line", "What is two plus two?", ("four!", "five and more"), 0)
    feats, mask, owners = ev.mc_rows([item], Pieces(), 64)
    for r in range(2):
        n = int(feats["decoder_segment_ids"][r].sum())
        prompt = feats[ev.PROMPT_MASK][r]
        assert prompt.sum() + mask[r].sum() == n  # every scored token is either question or choice
        assert not np.any(prompt * mask[r])
        assert prompt[:n].tolist() == [1] * int(prompt.sum()) + [0] * (n - int(prompt.sum()))


def test_cached_scorer_reuses_equal_batches_only(anchor, data_dir):
    class Counting(ev.ModelScorer):
        calls = 0

        def logprobs(self, batch):
            Counting.calls += 1
            return super().logprobs(batch)

    inner = Counting(*anchor, name="anchor")
    cached = ev.CachedScorer(inner)
    assert cached.name == "anchor" and cached.vocab_size == CFG.vocab_size
    b0, b1 = rows(data_dir, 2)
    first = cached.token_logprobs(b0)
    np.testing.assert_array_equal(cached.token_logprobs({k: v.copy() for k, v in b0.items()}), first)
    assert (Counting.calls, cached.hits) == (1, 1)
    cached.token_logprobs(b1)
    assert Counting.calls == 2
    # One changed target token is another batch: scored afresh, not served from the cache.
    changed = {k: v.copy() for k, v in b0.items()}
    changed["decoder_target_tokens"][0, 3] = (changed["decoder_target_tokens"][0, 3] + 1) % CFG.vocab_size
    assert not np.array_equal(cached.token_logprobs(changed), first)
    assert Counting.calls == 3
    # A BTM ensemble over cached members scores nothing again for batches they have seen.
    members = [ev.CachedScorer(ev.ModelScorer(*anchor)), ev.CachedScorer(ev.ModelScorer(*owner(anchor, "a", 0)))]
    want = ev.BTMScorer([m.inner for m in members]).token_logprobs(b0)
    for m in members:
        m.token_logprobs(b0)
    np.testing.assert_allclose(ev.BTMScorer(members).token_logprobs(b0), want, atol=1e-6)
    assert [m.hits for m in members] == [1, 1]


def test_mc_items_are_well_formed_and_scorable(data_dir, anchor):
    from flexmoe_jax import data
    from flexmoe_jax.data.pipeline import read_split_texts

    items = ev.mc_items(data_dir, "flexmix_mini.humor", split="train", n_items=8, n_choices=4)
    assert items and items == ev.mc_items(data_dir, "flexmix_mini.humor", split="train", n_items=8)  # deterministic
    texts = read_split_texts(data_dir, "flexmix_mini", "humor", "train")
    for it in items:
        assert len(it.choices) == 4 and 0 <= it.label < 4
        norm = [" ".join(c.split()) for c in it.choices]
        assert len(set(norm)) == 4  # distinct choices
        doc = texts[it.doc]
        assert doc.startswith(it.context) and len(it.context.strip()) >= ev.MC_MIN_CONTEXT
        truth = it.choices[it.label]
        rest = doc[len(it.context):]  # the true continuation is what follows the context in its document
        if it.mode == "line":
            assert rest.startswith(truth) and rest[len(truth):].strip(" \t")[:1] in ("", "\n")
        else:
            assert it.mode in ("sentence", "clause")
            assert truth.startswith(" ") and rest.lstrip().startswith(truth.strip())
        for k, c in enumerate(it.choices):
            if k != it.label:
                assert " ".join(c.split()) not in " ".join(doc.split())  # distractors come from elsewhere
    assert [it.label for it in items] != [items[0].label] * len(items) or len(items) < 3
    public = ev.mc_items(data_dir, "flexmix_mini.public", split="train", n_items=6)
    assert {it.source for it in public} == {"public_gcide", "public_wordnet", "public_foldoc"}  # round robin
    # Length-matched distractors: with short and long units on offer, a long truth gets long
    # distractors and a short truth short ones.
    docs = [f"Entry number {i} begins here.\nshort{i:03d} item\n" for i in range(20)]
    docs += [f"Entry number {i} begins here.\n" + f"a long line {i:03d} " * 6 + "\n" for i in range(20, 40)]
    built = ev.build_mc_items(docs, "toy", "toy", n_items=40, n_choices=4)
    assert len(built) == 40
    for it in built:
        long_truth = len(it.choices[it.label]) > 40
        assert all((len(c) > 40) == long_truth for c in it.choices), it

    sp = data.sentencepiece(data_dir)
    scorer = ev.ModelScorer(*anchor)
    lls = ev.choice_loglikelihoods(scorer, items[:2], sp, SEQ, BS)
    ctx, cont = ev._encode_pair(sp, items[0].context, items[0].choices[1])
    toks = np.array([[0] + ctx + cont], np.int32)
    lp = direct_logprobs(anchor[0], anchor[1], {
        "decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:],
        "decoder_positions": np.arange(toks.shape[1] - 1)[None], "decoder_segment_ids": np.ones_like(toks[:, 1:])})
    assert lls[0][1] == pytest.approx(lp[0, -len(cont):].sum(), rel=1e-4)
    r = ev.score_mc(scorer, items, sp, SEQ, BS)
    assert 0.0 <= r["mc_acc"] <= 1.0 and 0.0 <= r["mc_acc_norm"] <= 1.0 and r["mc_items"] == len(items)
    assert ev.split_document("one line only") is None


def test_opt_out_changes_results_and_main_eval_reports(data_dir, tmp_path):
    cfg = CFG.replace(num_experts=3, top_k=2, expert_names=("public", "a", "b"))
    params = model.init(cfg, 3)
    checkpoint.save(tmp_path / "merged", cfg, params)
    kw = dict(tasks=["public"], seq_len=SEQ, batch_size=BS, mc_items_per_domain=4, progress=False, log=None)
    full = ev.main_eval(str(tmp_path / "merged"), data_dir, json_out=tmp_path / "r.json", **kw)
    minus = ev.main_eval([str(tmp_path / "merged")], data_dir, exclude=["b"], json_out=tmp_path / "r.json",
                         table_out=tmp_path / "r.md", plot_out=tmp_path / "r.png", **kw)
    assert list(full) == ["merged"] and list(minus) == ["merged_minus_b"]
    assert full["merged"]["public"]["bpb"] != minus["merged_minus_b"]["public"]["bpb"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved) == {"merged", "merged_minus_b"}  # the second call kept the first's results
    assert saved["merged"]["public"]["bpb"] == full["merged"]["public"]["bpb"]
    in_memory = ev.evaluate(ev.ModelScorer(cfg, params, active_experts=["public", "a"]), data_dir, **{
        k: v for k, v in kw.items() if k != "log"})
    assert in_memory["public"]["bpb"] == pytest.approx(minus["merged_minus_b"]["public"]["bpb"], rel=1e-6)

    table = (tmp_path / "r.md").read_text()
    assert "| merged_minus_b |" in table and "bits per byte" in table and "public" in table
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    with pytest.raises(ValueError, match="unknown task"):
        ev.main_eval(str(tmp_path / "merged"), data_dir, tasks=["nope"], log=None, progress=False)


def test_results_table_and_plot_from_results(tmp_path):
    res = {"public": {"code": {"bpb": 1.5, "mc_acc": 0.25}, "public": {"bpb": 1.0, "mc_acc": None},
                      "average": {"bpb": 1.5, "mc_acc": 0.25}},
           "flexolmo": {"code": {"bpb": 1.2, "mc_acc": 0.5}, "public": {"bpb": 1.1, "mc_acc": None},
                        "average": {"bpb": 1.2, "mc_acc": 0.5}}}
    table = ev.results_table(res)
    lines = table.splitlines()
    assert "| model | code | public | average |" in lines
    assert "| flexolmo | **1.2000** | 1.1000 | **1.2000** |" in lines
    assert "| public | 0.250 | – | 0.250 |" in lines
    out = ev.plot(res, tmp_path / "sub" / "bpb.png")
    assert out.exists() and out.stat().st_size > 1000
