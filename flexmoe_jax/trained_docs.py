"""Which documents a training run actually trained on, replayed from the data position in its checkpoint.

:func:`trained_documents` rebuilds the run's iterator (:class:`flexmoe_jax.data.batching.Batches`) at the
position saved with a checkpoint (``RUN/state/<step>/``), replays batches ``0 .. step-1`` of the whole
global batch and matches the packed segments fed, by content, against the split's document pieces
(``seq_len`` tokens of ``ids + [EOS]`` each). Returns a :class:`TrainedDocuments`. Why pieces, and how
public-replay runs are handled: docs/privacy.md ("Which documents a run trained on").
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from flexmoe_jax.errors import UserError


@dataclasses.dataclass
class TrainedDocuments:
    """The documents of one task's split that a run trained on (a document counts when any of its
    pieces was fed).

    ``indices``: their positions in the split in storage order (the order :func:`split_texts` reads),
    ascending; ``documents``: their token ids (no EOS), in the same order; ``pieces``: for each, the
    numbers of its pieces the run was fed (piece ``k`` is tokens ``k*seq_len .. (k+1)*seq_len - 1`` of
    ``ids + [EOS]``), ascending. ``split_docs``: documents in the whole split. ``steps``: the run had
    read batches ``0 .. steps-1`` (of ``batch_size`` rows of ``seq_len`` tokens) when checkpoint
    ``checkpoint_step`` was saved.
    """

    run_dir: str
    data_dir: str
    task: str
    split: str
    run_task: str
    steps: int
    checkpoint_step: int
    batch_size: int
    seq_len: int
    seed: int
    split_docs: int
    rows_seen: int
    indices: list[int]
    documents: list[list[int]]
    pieces: list[list[int]]

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self) -> str:
        """One line: where the documents come from and how many there are."""
        steps = f"steps 0-{self.steps - 1}" if self.steps else "no steps"
        return (f"run {self.run_dir}, {steps} ({self.steps} steps x {self.batch_size} rows of "
                f"{self.seq_len} tokens of {self.run_task}): {len(self)} of {self.split_docs} {self.task} "
                f"{self.split} documents trained on")

    def fed_pieces(self, min_tokens: int) -> list[tuple[int, int, list[int]]]:
        """``(document index, piece number, tokens)`` of every fed piece holding at least
        ``min_tokens`` document tokens (EOS not counted), in split order: the text the run trained on."""
        return [(i, k, ids[k * self.seq_len:(k + 1) * self.seq_len])
                for i, ids, fed in zip(self.indices, self.documents, self.pieces) for k in fed
                if len(ids[k * self.seq_len:(k + 1) * self.seq_len]) >= min_tokens]

    def to_json(self) -> dict:
        """Everything but the token ids (JSON-ready)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("documents", "pieces")}


# ----------------------------------------------------------------------------- the run's records

def _state_dir(run_dir) -> Path:
    p = Path(os.fspath(run_dir))
    if not p.is_dir():
        raise UserError(f"{run_dir} is not a training run directory: it does not exist")
    state = p / "state"
    if not state.is_dir():
        hint = (" (it looks like a saved model; pass the run directory above it)"
                if (p / "config.json").is_file() and p.name in ("model", "expert") else "")
        raise UserError(f"{run_dir} is not a training run directory: it has no state/ (the checkpoints "
                        f"`flexmoe train` / `flexmoe train-expert` write){hint}")
    return state


def data_position(run_dir, step: int | None = None) -> dict:
    """The data iterator's position saved with the run's checkpoint at ``step`` (default: the latest),
    plus ``checkpoint_step``: ``{"name", "split", "batch_size", "seq_len", "seed", "step", ...}``."""
    import orbax.checkpoint as ocp

    state = _state_dir(run_dir)
    mngr = ocp.CheckpointManager(state, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = list(mngr.all_steps())
        if not steps:
            raise UserError(f"{run_dir} has no complete checkpoint in {state}: the run saved no data position yet")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UserError(f"{run_dir} has no checkpoint of step {step}; it keeps steps {sorted(steps)}")
        if not (state / str(step) / "data").is_dir():
            raise UserError(f"{run_dir}'s checkpoint of step {step} has no saved data position (state/{step}/data/)")
        try:
            pos = mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; the path is what helps
            raise UserError(f"cannot read the saved data position of {run_dir}, step {step}: {e}") from e
    finally:
        mngr.close()
    need = {"name", "split", "batch_size", "seq_len", "seed", "step"}
    if not isinstance(pos, dict) or not need <= set(pos):
        raise UserError(f"{run_dir}'s checkpoint of step {step} has no valid data position: {pos!r}")
    return {**pos, "checkpoint_step": int(step)}


_BINDING = re.compile(r"^RunConfig\.(\w+)\s*=\s*(.+?)\s*$")


def run_settings(run_dir) -> dict[str, Any]:
    """The ``RunConfig`` bindings a run recorded (gin text in ``model/`` metadata or the expert
    manifest); ``{}`` when it recorded none. Only single-line literal values are read."""
    p = Path(os.fspath(run_dir))
    texts = []
    for f in (p / "model" / "metadata.json", p / "expert" / "manifest.json"):
        try:
            texts.append(json.loads(f.read_text()).get("gin_config") or "")
        except (OSError, ValueError, AttributeError):
            continue
    out: dict[str, Any] = {}
    for text in texts:
        for line in text.splitlines():
            m = _BINDING.match(line)
            if m and m.group(1) not in out:
                try:
                    out[m.group(1)] = ast.literal_eval(m.group(2))
                except (ValueError, SyntaxError):
                    continue
        if out:
            break
    return out


def _register_run_task(name: str, data_dir, settings: dict) -> None:
    """Make ``name`` (a task, mixture or public-replay mixture) known in ``data_dir``."""
    from flexmoe_jax import data
    from flexmoe_jax.data import tasks as T

    known = set(data.register_tasks(data_dir))
    if name in known:
        return
    base, at, pct = name.rpartition("@")
    splits = [(base[:i], base[i + 1:]) for i, c in enumerate(base) if c == "+"] if at else []
    splits = [(t, p) for t, p in splits if t in known and p in known]
    if not splits or not pct.isdigit():
        missing = base.split("+") if at and "+" in base else [name]
        raise UserError(f"the run trained on '{name}', which {data_dir} does not hold (no task or mixture "
                        f"{', '.join(repr(m) for m in missing if m not in known)}): pass the data directory "
                        "the run trained with, or one with the same datasets")
    task, public = splits[0]
    share = int(pct) / 100
    recorded = settings.get("public_replay")
    if (isinstance(recorded, (int, float)) and 0 < recorded < 1 and settings.get("task", task) == task
            and settings.get("public_task", data.PUBLIC_MIXTURE) == public and round(recorded * 100) == int(pct)):
        share = float(recorded)  # the exact share (the name keeps only whole percents)
    got = T.register_replay_mixture(task, public, share, data_dir)
    if got != name:  # cannot happen for a name register_replay_mixture made
        raise UserError(f"could not rebuild the run's mixture '{name}' (got '{got}')")


# ----------------------------------------------------------------------------- documents

def split_texts(task: str, split: str, data_dir) -> list[str]:
    """Every raw text of a seqio task's split, in storage order (tfds files unshuffled)."""
    import seqio

    from flexmoe_jax import data

    data.register_tasks(data_dir)
    t = seqio.get_mixture_or_task(task)
    if isinstance(t, seqio.Mixture):
        raise UserError(f"'{task}' is a mixture; pass one of its tasks: {', '.join(sorted(x.name for x in t.tasks))}")
    if split not in t.splits:
        raise UserError(f"task '{task}' has no split '{split}' (it has {', '.join(t.splits)})")
    loader = getattr(t.source, "tfds_dataset", None)
    ds = (loader.builder.as_dataset(split=split, shuffle_files=False) if loader is not None
          else t.source.get_dataset(split=split, shuffle=False))
    return [ex["text"].decode("utf-8") for ex in ds.as_numpy_iterator()]


def task_processor(task: str, data_dir):
    """The SentencePiece processor of the task's own vocabulary (the ids seqio gives its documents)."""
    import seqio

    from flexmoe_jax import data
    from flexmoe_jax.data import tokenizer

    data.register_tasks(data_dir)
    vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    return tokenizer.processor(vocab.sentencepiece_model_file)


def split_documents(task: str, split: str, data_dir) -> list[list[int]]:
    """Every document of a task's split, tokenized as the task tokenizes it (no EOS), in storage order."""
    texts = split_texts(task, split, data_dir)
    if not texts:
        return []
    sp = task_processor(task, data_dir)
    return [[int(x) for x in ids] for ids in sp.encode(texts, num_threads=max(1, min(4, os.cpu_count() or 1)))]


def pieces(ids, seq_len: int) -> list[np.ndarray]:
    """Every piece the task pipeline makes of a document: ``ids + [EOS]`` cut every ``seq_len`` tokens."""
    from flexmoe_jax.data.tokenizer import EOS_ID

    full = np.asarray(list(ids) + [EOS_ID], np.int32)
    return [full[i:i + seq_len] for i in range(0, len(full), seq_len)]


def split_pieces(docs: list[list[int]], seq_len: int, min_tokens: int) -> list[tuple[int, int, list[int]]]:
    """``(document index, piece number, tokens)`` of every piece of ``docs`` (cut every ``seq_len``
    tokens as the task pipeline cuts them) holding at least ``min_tokens`` document tokens."""
    return [(i, k, ids[a:a + seq_len]) for i, ids in enumerate(docs) for k, a in enumerate(range(0, len(ids), seq_len))
            if len(ids[a:a + seq_len]) >= min_tokens]


def row_segments(targets: np.ndarray, segment_ids: np.ndarray) -> list[np.ndarray]:
    """The packed segments (document pieces) of one row: the target tokens of each segment id > 0."""
    cuts = np.flatnonzero(np.diff(segment_ids)) + 1
    return [targets[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(segment_ids)]) if segment_ids[a] > 0]


def segments_seen(position: dict, data_dir, progress: bool = False) -> tuple[set[bytes], int]:
    """(int32 bytes of every segment, distinct rows) of batches ``0 .. position["step"]-1`` of the
    whole global batch of the iterator whose saved ``position`` is given."""
    from tqdm.auto import tqdm

    from flexmoe_jax import data

    state = {k: position[k] for k in ("name", "split", "batch_size", "seq_len", "seed")}
    it = data.batches_from_state({**state, "step": 0, "shard_index": 0, "num_shards": 1}, data_dir)
    rows: set[bytes] = set()
    segments: set[bytes] = set()
    for step in tqdm(range(int(position["step"])), desc="replaying batches", unit="step", disable=not progress,
                     leave=False):
        b = it.batch_at(step)
        tgt, seg = b["decoder_target_tokens"], b["decoder_segment_ids"]
        for t, s in zip(tgt, seg):
            key = t.tobytes() + s.tobytes()
            if key in rows:  # the same packed row again (a later epoch)
                continue
            rows.add(key)
            segments.update(x.tobytes() for x in row_segments(t, s))
    return segments, len(rows)


def _resolve_domain(domain: str | None, run_tasks: list[str], owner_task: str | None, run_task: str,
                    run_dir, data_dir) -> str:
    from flexmoe_jax import data

    if domain is None:
        if owner_task is not None:
            return owner_task
        if len(run_tasks) == 1:
            return run_tasks[0]
        raise UserError(f"{run_dir} trained on the mixture '{run_task}' of {', '.join(run_tasks)}: pass domain= "
                        "to say whose documents to find")
    for cand in (domain, f"{data.TASK_PREFIX}{domain}"):
        if cand in run_tasks:
            return cand
    short = [t[len(data.TASK_PREFIX):] if t.startswith(data.TASK_PREFIX) else t for t in run_tasks]
    raise UserError(f"{run_dir} never read domain '{domain}': it trained on '{run_task}' "
                    f"(tasks {', '.join(short)}) in {data_dir}")


def trained_documents(run_dir, data_dir=None, domain: str | None = None, *, step: int | None = None,
                      progress: bool = False) -> TrainedDocuments:
    """The documents of ``domain``'s training split that the run in ``run_dir`` trained on.

    ``data_dir``: a data directory holding the datasets the run trained on (default: the run's
    recorded ``RunConfig.data_dir``); an owner's directory of hard links and the full one give the
    same documents. ``domain``: a short (``humor``) or full task name; default the run's own task
    (an owner's task, also in a public-replay mixture). ``step``: use the checkpoint of that step
    (default: the latest, which for a finished run is its last step). See docs/privacy.md.

    Raises ValueError for a directory that is not a run, a run without a saved data position, a
    data directory without the run's task, or a domain the run never read.
    """
    import seqio

    position = data_position(run_dir, step)
    settings = run_settings(run_dir)
    if data_dir is None:
        data_dir = settings.get("data_dir")
        if not data_dir:
            raise UserError(f"{run_dir} records no RunConfig.data_dir: pass data_dir")
    if not Path(data_dir).is_dir():
        raise UserError(f"data directory {data_dir} does not exist")
    run_task = position["name"]
    _register_run_task(run_task, data_dir, settings)
    provider = seqio.get_mixture_or_task(run_task)
    run_tasks = sorted(t.name for t in provider.tasks) if isinstance(provider, seqio.Mixture) else [run_task]
    base, at, _ = run_task.rpartition("@")
    owner = None
    if at and "+" in base:
        owner = next((t for t in run_tasks if base.startswith(t + "+")), None)
    task = _resolve_domain(domain, run_tasks, owner, run_task, run_dir, data_dir)

    split, seq_len = position["split"], int(position["seq_len"])
    docs = split_documents(task, split, data_dir)
    seen, n_rows = segments_seen(position, data_dir, progress=progress)
    fed = {i: k for i, ids in enumerate(docs)
           if (k := [n for n, p in enumerate(pieces(ids, seq_len)) if p.tobytes() in seen])}
    indices = sorted(fed)
    if not indices and position["step"] > 0 and (task == owner or len(run_tasks) == 1):
        raise UserError(f"none of the {len(docs)} {split} documents of {task} in {data_dir} appears in the "
                        f"{position['step']} batches {run_dir} trained on: is it the data directory (or a copy of "
                        "the datasets) the run trained with?")
    return TrainedDocuments(run_dir=os.path.abspath(run_dir), data_dir=os.path.abspath(data_dir), task=task,
                            split=split, run_task=run_task,
                            steps=int(position["step"]), checkpoint_step=int(position["checkpoint_step"]),
                            batch_size=int(position["batch_size"]), seq_len=seq_len, seed=int(position["seed"]),
                            split_docs=len(docs), rows_seen=n_rows, indices=indices,
                            documents=[docs[i] for i in indices], pieces=[fed[i] for i in indices])
