"""Which token sequences the privacy check prompts with: whole documents in storage order, or (with
``trained_from``) pieces a run was fed against held-out pieces cut the same way. See docs/privacy.md."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from flexmoe_jax.errors import UserError


def load_documents(data_dir, domain: str, split: str, num_docs: int, min_tokens: int,
                   scan: int | None = None) -> list[list[int]]:
    """The first ``num_docs`` documents of a domain's split with at least ``min_tokens`` tokens, tokenized.

    Reads up to ``scan`` documents (default ``10 * num_docs``) in storage order (a fixed
    pseudo-random sample, :func:`flexmoe_jax.router_init.documents`) and keeps the long enough ones,
    so short documents do not shrink the sample. May return fewer than ``num_docs`` (small splits).
    """
    from flexmoe_jax import data, eval as eval_lib, router_init

    if num_docs < 1:
        raise UserError(f"num_docs must be a positive integer, got {num_docs!r}")
    (task,) = eval_lib.resolve_tasks(data_dir, [domain])
    sp = data.sentencepiece(data_dir)
    texts = router_init.documents(task, data_dir, scan or 10 * num_docs, split)
    out = []
    for text in texts:
        ids = [int(x) for x in sp.encode(text)]
        if len(ids) >= min_tokens:
            out.append(ids)
            if len(out) == num_docs:
                break
    return out


def _sample(pool: Sequence, k: int, seed: int, task: str, split: str) -> list[int]:
    """``min(k, len(pool))`` distinct indices into ``pool``, seeded by (seed, task, split), ascending."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])
    return sorted(int(i) for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False))


def trained_sets(trained_from: Mapping, data_dir, tasks: Sequence[str], need: int) -> dict:
    """``{task: TrainedDocuments}`` of ``trained_from`` (domain -> run directory or TrainedDocuments)."""
    from flexmoe_jax import eval as eval_lib, trained_docs
    from flexmoe_jax.data import layout as L

    if not isinstance(trained_from, Mapping):
        raise UserError(f"trained_from must map domains to run directories, got {type(trained_from).__name__}")
    out = {}
    for dom, src in trained_from.items():
        (task,) = eval_lib.resolve_tasks(data_dir, [dom])
        if task not in tasks:
            raise UserError(f"trained_from names domain {dom!r}, which is not among the domains checked "
                            f"({', '.join(eval_lib.short_name(t) for t in tasks)})")
        if isinstance(src, trained_docs.TrainedDocuments):
            got = src
            if got.task != task:
                raise UserError(f"trained_from[{dom!r}] lists documents of {got.task}, not of {task}")
            tok = L.tokenizer_path(data_dir)
            if Path(got.data_dir).resolve() != Path(data_dir).resolve() and (
                    not L.tokenizer_path(got.data_dir).is_file()
                    or L.tokenizer_path(got.data_dir).read_bytes() != tok.read_bytes()):
                raise UserError(f"trained_from[{dom!r}] was tokenized with the tokenizer of {got.data_dir}, "
                                f"not the one of {data_dir}")
        elif isinstance(src, (str, os.PathLike)):
            got = trained_docs.trained_documents(src, data_dir, task)
        else:
            raise UserError(f"trained_from[{dom!r}] must be a run directory or TrainedDocuments, "
                            f"got {type(src).__name__}")
        if got.seq_len < need:
            raise UserError(f"{got.run_dir} trained on rows of seq_len={got.seq_len} tokens, fewer than prefix_len "
                            f"+ suffix_len = {need}: its model never saw a prefix and its reference in one row; "
                            "lower prefix_len/suffix_len")
        out[task] = got
    return out


def select_texts(data_dir, task: str, split: str, trained, num_docs: int, need: int, seed: int,
            scan: int | None) -> tuple[list[list[int]], dict]:
    """(documents, selection record) of one domain's split; the rules: docs/privacy.md."""
    from flexmoe_jax import eval as eval_lib, trained_docs

    dom = eval_lib.short_name(task)
    if trained is None:  # as before: the first long enough documents in storage order
        found = load_documents(data_dir, task, split, num_docs, need, scan)
        if not found:
            raise UserError(f"{dom} has no {split} document of at least prefix_len + suffix_len = {need} tokens "
                            f"in {data_dir}: lower prefix_len/suffix_len or build more data")
        known = None if split == "train" else False
        note = ("; not known to be trained on (pass trained_from to check the documents a run trained on)"
                if known is None else "; held out (never in the training split)")
        return found, {"source": f"the first {len(found)} {split} documents of {dom} of at least {need} tokens in "
                                 f"storage order{note}",
                       "trained_on": known, "available": None, "used": len(found)}
    # Runs read pieces of documents (seq_len tokens each), rarely whole ones: check the pieces fed, and
    # as the control, pieces of held-out documents cut the same way (both uniform over pieces).
    if split == trained.split:
        pool = trained.fed_pieces(need)
        where = trained.describe()
        kind = "trained-on"
    else:
        split_docs = trained_docs.split_documents(task, split, data_dir)
        pool = trained_docs.split_pieces(split_docs, trained.seq_len, need)
        where = f"held out: {len(split_docs)} {split} documents of {task} in {data_dir}"
        kind = "held-out"
    if not pool:
        raise UserError(f"{dom} has no {kind} {split} piece of at least prefix_len + suffix_len = {need} tokens "
                        f"({where}): lower prefix_len/suffix_len, train longer or build more data")
    chosen = [pool[i] for i in _sample(pool, num_docs, seed, task, split)]
    record = {"source": f"{where}; {len(pool)} {kind} pieces (documents cut every {trained.seq_len} tokens, as "
                        f"the run's rows cut them) have at least {need} tokens; {len(chosen)} drawn at random "
                        f"(seed {seed})",
              "trained_on": split == trained.split, "available": len(pool), "used": len(chosen), "unit": "piece",
              "doc_indices": [int(i) for i, _, _ in chosen], "piece_indices": [int(k) for _, k, _ in chosen]}
    if split == trained.split:
        record["run"] = {k: v for k, v in trained.to_json().items() if k != "indices"}
    return [list(toks) for _, _, toks in chosen], record
