"""seqio Tasks and Mixtures for FlexMix-mini and owners' data, packing, and the checkpointable iterator.

Tasks (registered by :func:`register_tasks`)
  ``flexmix_mini.<config>`` for ``code math literature humor techdocs public_gcide public_wordnet
  public_foldoc``; each owner's registered name. Source: the tfds dataset (read-only); preprocessors:
  ``text`` -> ``targets``, SentencePiece tokenize, append EOS, then split every document into pieces of
  at most ``sequence_length["targets"]`` tokens (nothing is truncated away).
Mixtures
  ``flexmix_mini.public`` (the three public sources) and ``flexmix_mini.all`` (everything: only for
  the unrestricted baseline), with rates proportional to each task's training tokens.
Feature converter
  ``seqio.DecoderFeatureConverter(pack=True)``: decoder-only, several documents packed per row with
  ``decoder_segment_ids`` / ``decoder_positions``, BOS = pad = 0.

Batches (:class:`Batches`)
  Each (task, split, length) is packed once by seqio into a row store (``DATA_DIR/cache/packed``,
  memory-mapped .npy). A training batch is then a pure function of ``(seed, step)``: each of its
  ``batch_size`` slots draws a task from the mixture rates (a counter-based RNG per block of 1024
  steps), and takes that task's next row in an epoch-wise permutation seeded by ``(seed, task, epoch)``.
  Hence ``batches(..., start_step=N)`` yields exactly batch ``N`` of an uninterrupted run, resuming
  costs O(N / 1024) vectorized draws, and the iterator's whole state is ``{"step": N}`` plus its
  arguments (:meth:`Batches.state`). Assembling a batch is a gather from memory-mapped arrays, so the
  pipeline runs at thousands of batches per second on one CPU core (``bench/bench_data.py``).
  The packing is done once, so the same documents share a row in every epoch (their segments are
  masked from each other); rows, not documents, are what gets reshuffled each epoch.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from flexmoe_jax.data import layout as L, sources as S
from flexmoe_jax.errors import UserError

FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")
_BLOCK = 1024  # steps per block of mixture draws

# name -> (data_dir, key) of every task/mixture this module registered in this process.
_REGISTERED: dict[str, tuple[str, str]] = {}


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _quiet_tf():
    """Quiet TF's Python logging, and keep TF off any GPU (JAX owns the accelerators)."""
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialized
        pass


# ----------------------------------------------------------------------------- preprocessors
def split_to_length(dataset, sequence_length=None, output_features=None):
    """Split ``targets`` into consecutive pieces of at most ``sequence_length["targets"]`` tokens."""
    import tensorflow as tf

    del output_features
    if not sequence_length or not sequence_length.get("targets"):
        return dataset
    length = int(sequence_length["targets"])

    def split(ex):
        t = ex["targets"]
        n = tf.size(t)
        pieces = (n + length - 1) // length
        sizes = tf.concat([tf.fill([tf.maximum(pieces - 1, 0)], length),
                           [n - (pieces - 1) * length]], axis=0)
        return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_lengths(t, sizes)})

    return dataset.flat_map(split)


def _text_to_targets(dataset):
    import tensorflow as tf

    return dataset.map(lambda ex: {"targets": ex["text"]}, num_parallel_calls=tf.data.AUTOTUNE)


def _task_spec(name: str, tfds_name: str, data_dir, vocab_path) -> dict:
    import seqio

    from flexmoe_jax.data import tokenizer as T

    vocab = T.seqio_vocabulary(vocab_path)
    return dict(
        name=name,
        source=seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=str(L.tfds_dir(data_dir)), read_only=True),
        preprocessors=[_text_to_targets,
                       functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                       seqio.preprocessors.append_eos,
                       split_to_length],
        output_features={"targets": seqio.Feature(vocabulary=vocab, add_eos=True)},
        shuffle_buffer_size=10_000,
    )


def _clash(name: str) -> bool:
    import seqio

    return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


def _add(kind: str, name: str, data_dir, key: str, spec: dict) -> None:
    import seqio

    ident = (str(Path(data_dir).resolve()), key)
    if name in _REGISTERED:
        if _REGISTERED[name] == ident:
            return
        seqio.TaskRegistry.remove(name)
        seqio.MixtureRegistry.remove(name)
    elif _clash(name):
        raise UserError(f"a seqio task or mixture named '{name}' is already registered in this process")
    if kind == "task":
        seqio.TaskRegistry.add(**spec)
    else:
        seqio.MixtureRegistry.add(name, **spec)
    _REGISTERED[name] = ident


def owner_manifests(data_dir) -> dict[str, dict]:
    d = L.owners_dir(data_dir)
    out = {}
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            m = json.loads(p.read_text())
            if L.dataset_ready(data_dir, L.OWNER_NAME, m["name"]):
                out[m["name"]] = m
    return out


def register_tasks(data_dir) -> list[str]:
    """Register the seqio tasks and mixtures of everything built or registered in ``data_dir``.

    Idempotent; calling it for another ``data_dir`` re-points the names this module registered.
    Returns the registered task and mixture names.
    """
    _quiet_tf()
    from flexmoe_jax.data import card as C, pipeline

    data_dir = L.root(data_dir).resolve()
    manifest = pipeline.read_manifest(data_dir)
    names = []
    built = [c for c in S.CONFIGS if c in manifest.get("configs", {})
             and L.dataset_ready(data_dir, L.FLEXMIX_NAME, c)]
    if built:
        tok = L.tokenizer_path(data_dir)
        tok_key = manifest.get("tokenizer", {}).get("key", "")
        card = C.load(data_dir)
        for c in built:
            name = f"{L.TASK_PREFIX}{c}"
            key = f"{manifest['configs'][c]['key']}/{tok_key}"
            _add("task", name, data_dir, key, _task_spec(name, L.tfds_name(L.FLEXMIX_NAME, c), data_dir, tok))
            names.append(name)
        rates = {f"{L.TASK_PREFIX}{c}": card["configs"][c]["splits"]["train"]["tokens"]
                 for c in built if c in card["configs"]}
        public = [f"{L.TASK_PREFIX}{c}" for c in S.PUBLIC_SOURCES if c in built]
        mkey = manifest.get("card_key") or ""
        if public:
            _add("mixture", L.PUBLIC_MIXTURE, data_dir, mkey,
                 {"tasks": [(t, max(1, rates.get(t, 1))) for t in public]})
            names.append(L.PUBLIC_MIXTURE)
        _add("mixture", L.ALL_MIXTURE, data_dir, mkey,
             {"tasks": [(f"{L.TASK_PREFIX}{c}", max(1, rates.get(f"{L.TASK_PREFIX}{c}", 1))) for c in built]})
        names.append(L.ALL_MIXTURE)
    for name, m in owner_manifests(data_dir).items():
        vocab = L.owners_dir(data_dir) / name / "spm.model"
        _add("task", name, data_dir, m["key"], _task_spec(name, L.tfds_name(L.OWNER_NAME, name), data_dir, vocab))
        names.append(name)
    return names


def register_replay_mixture(task: str, public: str, public_share: float, data_dir) -> str:
    """A mixture of ``task`` and the public data (``public``, a task or mixture) in which a
    ``public_share`` of the rows are public; returns its name (registered idempotently).

    Used for expert training with public replay: the owner's router then also sees public text,
    where the public expert should win (public data is public; no other owner's data enters).
    """
    if not 0 < public_share < 1:
        raise UserError(f"public_share must be between 0 and 1, got {public_share}")
    register_tasks(data_dir)
    pub_tasks, pub_rates = _tasks_and_rates(public, data_dir)
    _tasks_and_rates(task, data_dir)  # fails clearly on an unknown task
    parts = [(task, 1.0 - public_share)] + [(t, float(r) * public_share) for t, r in zip(pub_tasks, pub_rates)]
    name = f"{task}+{public}@{round(public_share * 100)}"
    _add("mixture", name, data_dir, json.dumps(parts), {"tasks": parts})
    return name


def _provider(name: str, data_dir):
    _quiet_tf()
    import seqio

    if name not in _REGISTERED:
        register_tasks(data_dir)
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        raise UserError(f"unknown task or mixture '{name}' in {data_dir}; known: "
                        f"{', '.join(sorted(register_tasks(data_dir)))}") from None


def _tasks_and_rates(name: str, data_dir) -> tuple[list[str], np.ndarray]:
    import seqio

    p = _provider(name, data_dir)
    if isinstance(p, seqio.Mixture):
        tasks = sorted(p.tasks, key=lambda t: t.name)
        rates = np.array([float(p.get_rate(t)) for t in tasks], np.float64)
        return [t.name for t in tasks], rates / rates.sum()
    return [p.name], np.ones(1)


# ------------------------------------------------------------------------------ packed rows
def _cache_key(name: str) -> str | None:
    return None if name not in _REGISTERED else "/".join(_REGISTERED[name])


def packed_rows(name: str, split: str, seq_len: int, data_dir) -> dict[str, np.ndarray]:
    """Every document of a task's split, tokenized, split and packed by seqio into ``[rows, seq_len]``.

    Cached under ``DATA_DIR/cache/packed/<task>/<split>-L<seq_len>/`` (memory-mapped on load).
    """
    _provider(name, data_dir)
    key = _cache_key(name)
    d = L.cache_dir(data_dir) / "packed" / name / f"{split}-L{seq_len}"
    meta = d / "meta.json"
    if key is not None and meta.exists() and json.loads(meta.read_text()).get("key") == key:
        return {f: np.load(d / f"{f}.npy", mmap_mode="r") for f in FEATURES}
    rows = _pack(name, split, seq_len)
    if key is not None:
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in FEATURES:
            np.save(tmp / f"{f}.npy", rows[f])
        (tmp / "meta.json").write_text(json.dumps({"key": key, "rows": int(len(rows[FEATURES[0]]))}))
        _publish_cache(tmp, d, key)
    return rows


def _publish_cache(tmp: Path, d: Path, key: str) -> None:
    """Move a finished cache directory into place. Two processes packing the same rows may race: a
    complete cache with the same key is kept (ours is dropped), a stale one is first renamed aside (so
    no reader ever sees a half-deleted directory), and losing the final rename is not an error."""
    def current() -> bool:
        try:
            return json.loads((d / "meta.json").read_text()).get("key") == key
        except (OSError, ValueError):
            return False

    if not current():
        if d.exists():
            aside = d.with_name(d.name + f".old{os.getpid()}")
            try:
                os.replace(d, aside)
            except OSError:
                aside = None
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, d)
            return
        except OSError:  # another process published first
            pass
    shutil.rmtree(tmp, ignore_errors=True)


def share_packed_rows(src_dir, dst_dir, names: Sequence[str], split: str, seq_len: int) -> list[str]:
    """Hard-link ``src_dir``'s packed rows of ``names`` into ``dst_dir``'s cache wherever ``dst_dir``
    holds the same dataset (equal content key), so a data directory made of links to another's
    datasets (an owner's, see ``flexmoe_jax.demo.owner_data_dir``) does not pack the same text
    again: packing the public sources took each owner process ~40 s on one core. Rows already
    cached in ``dst_dir``, missing in ``src_dir`` or packed from other content are left alone
    (``dst_dir`` then packs its own). Returns the names shared."""
    register_tasks(dst_dir)
    src_root, dst_root = Path(src_dir).resolve(), Path(dst_dir).resolve()
    shared = []
    for name in names:
        ident = _REGISTERED.get(name)
        if ident is None or ident[0] != str(dst_root):
            continue
        src = L.cache_dir(src_root) / "packed" / name / f"{split}-L{seq_len}"
        dst = L.cache_dir(dst_root) / "packed" / name / f"{split}-L{seq_len}"
        try:
            meta = json.loads((src / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("key") != f"{src_root}/{ident[1]}" or (dst / "meta.json").exists():
            continue
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in FEATURES:
            try:
                os.link(src / f"{f}.npy", tmp / f"{f}.npy")
            except OSError:  # another file system: copy
                shutil.copy2(src / f"{f}.npy", tmp / f"{f}.npy")
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": "/".join(ident)}))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        shared.append(name)
    return shared


def _pack(name: str, split: str, seq_len: int) -> dict[str, np.ndarray]:
    import seqio
    import tensorflow_datasets as tfds

    task = seqio.get_mixture_or_task(name)
    if split not in task.splits:
        raise UserError(f"task '{name}' has no split '{split}' (it has {', '.join(task.splits)})")
    ds = task.get_dataset({"targets": seq_len}, split=split, shuffle=False, num_epochs=1, use_cached=False,
                          seed=0)
    ds = seqio.DecoderFeatureConverter(pack=True)(ds, {"targets": seq_len})
    parts = {f: [] for f in FEATURES}
    for b in tfds.as_numpy(ds.batch(1024)):
        for f in FEATURES:
            parts[f].append(np.asarray(b[f], np.int32))
    if not parts[FEATURES[0]]:
        raise UserError(f"task '{name}' split '{split}' is empty")
    return {f: np.concatenate(v) for f, v in parts.items()}


# ------------------------------------------------------------------------------- iterators
def _stable_id(name: str) -> int:
    return zlib.crc32(name.encode())


class Batches:
    """Infinite, deterministic, resumable training batches (see module docstring).

    ``next(it)`` gives a dict of int32 numpy arrays ``[batch_size // num_shards, seq_len]`` for the
    five :data:`FEATURES`. ``it.step`` is the index of the next batch; ``it.state()`` is a small dict
    (JSON-serializable) from which :meth:`from_state` rebuilds the iterator at the same position.
    With ``num_shards > 1`` (one per host) shard ``i`` gets rows ``[i*B/n, (i+1)*B/n)`` of each global batch.
    """

    def __init__(self, name: str, split: str, batch_size: int, seq_len: int, data_dir, seed: int = 0,
                 start_step: int = 0, shard_index: int = 0, num_shards: int = 1, row_task: bool = False):
        if batch_size <= 0 or seq_len <= 0:
            raise UserError("batch_size and seq_len must be positive")
        if num_shards <= 0 or batch_size % num_shards or not 0 <= shard_index < num_shards:
            raise UserError(f"batch_size {batch_size} must split evenly into {num_shards} shards "
                            f"and 0 <= shard_index < num_shards")
        if start_step < 0:
            raise UserError("start_step must be >= 0")
        self.name, self.split, self.batch_size, self.seq_len = name, split, int(batch_size), int(seq_len)
        self.data_dir, self.seed = str(data_dir), int(seed)
        self.shard_index, self.num_shards = int(shard_index), int(num_shards)
        self.row_task = bool(row_task)  # also give "row_task": each row's index in self.tasks, per token
        self.tasks, self.rates = _tasks_and_rates(name, data_dir)
        self.rows = [packed_rows(t, split, seq_len, data_dir) for t in self.tasks]
        self.num_rows = np.array([len(r[FEATURES[0]]) for r in self.rows], np.int64)
        self._block_counts: list[np.ndarray] = []  # cumulative per-task draws before block b
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._last_draws: tuple[int, np.ndarray] | None = None
        self._counts_at: tuple[int, np.ndarray] | None = None  # (step, per-task draws before it)
        self.step = int(start_step)

    # -- the schedule: which task each slot of a step draws from
    def _draws(self, block: int) -> np.ndarray:
        if self._last_draws is not None and self._last_draws[0] == block:
            return self._last_draws[1]
        if len(self.tasks) == 1:
            d = np.zeros((_BLOCK, self.batch_size), np.int64)
        else:
            rng = np.random.default_rng([self.seed, 0x5EED, block])
            d = rng.choice(len(self.tasks), size=(_BLOCK, self.batch_size), p=self.rates)
        self._last_draws = (block, d)
        return d

    def _before_block(self, block: int) -> np.ndarray:
        while len(self._block_counts) <= block:
            b = len(self._block_counts)
            if b == 0:
                self._block_counts.append(np.zeros(len(self.tasks), np.int64))
            else:
                counts = np.bincount(self._draws(b - 1).ravel(), minlength=len(self.tasks))
                self._block_counts.append(self._block_counts[-1] + counts)
        return self._block_counts[block]

    def _perm(self, t: int, epoch: int) -> np.ndarray:
        k = (t, epoch)
        if k not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.tasks):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, _stable_id(self.tasks[t]), epoch])
            self._perm_cache[k] = rng.permutation(self.num_rows[t])
        return self._perm_cache[k]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """Batch number ``step`` (0-based) of this run, whatever was read before."""
        block, within = divmod(int(step), _BLOCK)
        draws = self._draws(block)
        if self._counts_at is not None and self._counts_at[0] == step:
            counts = self._counts_at[1]  # sequential reading: no recount
        else:
            counts = self._before_block(block).copy()
            if within:
                counts += np.bincount(draws[:within].ravel(), minlength=len(self.tasks))
        slots = draws[within]
        self._counts_at = (step + 1, counts + np.bincount(slots, minlength=len(self.tasks)))
        onehot = slots[:, None] == np.arange(len(self.tasks))[None, :]
        rank = (np.cumsum(onehot, axis=0) - 1)[np.arange(self.batch_size), slots]
        k = counts[slots] + rank  # how many rows this slot's task handed out before it
        lo = self.shard_index * (self.batch_size // self.num_shards)
        hi = lo + self.batch_size // self.num_shards
        slots, k = slots[lo:hi], k[lo:hi]
        out = {f: np.empty((hi - lo, self.seq_len), np.int32) for f in FEATURES}
        for t in np.unique(slots):
            sel = np.nonzero(slots == t)[0]
            epoch, pos = np.divmod(k[sel], self.num_rows[t])
            rows = np.empty(len(sel), np.int64)
            for e in np.unique(epoch):
                m = epoch == e
                rows[m] = self._perm(int(t), int(e))[pos[m]]
            for f in FEATURES:
                out[f][sel] = self.rows[t][f][rows]
        if self.row_task:
            out["row_task"] = np.broadcast_to(slots[:, None], (hi - lo, self.seq_len)).astype(np.int32)
        return out

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch_at(self.step)
        self.step += 1
        return b

    def state(self) -> dict:
        return {"name": self.name, "split": self.split, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "seed": self.seed, "step": self.step, "shard_index": self.shard_index,
                "num_shards": self.num_shards, "row_task": self.row_task}

    @classmethod
    def from_state(cls, state: dict, data_dir) -> "Batches":
        s = dict(state)
        step = s.pop("step")
        return cls(data_dir=data_dir, start_step=step, **s)

    def tokens_per_epoch(self) -> dict[str, int]:
        return {t: int(np.asarray(r["decoder_loss_weights"]).sum()) for t, r in zip(self.tasks, self.rows)}


def batches(name: str, split: str, batch_size: int, seq_len: int, data_dir, seed: int = 0,
            start_step: int = 0, shard_index: int = 0, num_shards: int = 1, row_task: bool = False) -> Batches:
    """Training batches of a task or mixture; see :class:`Batches`."""
    return Batches(name, split, batch_size, seq_len, data_dir, seed=seed, start_step=start_step,
                   shard_index=shard_index, num_shards=num_shards, row_task=row_task)


def eval_batches(name: str, split: str, batch_size: int, seq_len: int, data_dir) -> Iterator[dict[str, np.ndarray]]:
    """Every packed row of the split exactly once (tasks in name order, rows in storage order); the
    last batch is padded with all-zero rows (loss weight 0). Summing the loss over
    ``decoder_loss_weights`` gives the NLL of every token of the split: divide by ``ln 2`` times
    :func:`split_stats` ``["bytes"]`` for bits per byte."""
    tasks, _ = _tasks_and_rates(name, data_dir)
    buf = {f: [] for f in FEATURES}
    n = 0
    for t in tasks:
        rows = packed_rows(t, split, seq_len, data_dir)
        for i in range(len(rows[FEATURES[0]])):
            for f in FEATURES:
                buf[f].append(rows[f][i])
            n += 1
            if n == batch_size:
                yield {f: np.stack(v).astype(np.int32) for f, v in buf.items()}
                buf, n = {f: [] for f in FEATURES}, 0
    if n:
        for f in FEATURES:
            buf[f].extend([np.zeros(seq_len, np.int32)] * (batch_size - n))
        yield {f: np.stack(v).astype(np.int32) for f, v in buf.items()}


def split_stats(name: str, split: str, data_dir) -> dict[str, int]:
    """Documents, UTF-8 bytes and tokens (with one EOS per document) of a task's or mixture's split."""
    from flexmoe_jax.data import card as C

    tasks, _ = _tasks_and_rates(name, data_dir)
    owners = owner_manifests(data_dir)
    card = None
    out = {"docs": 0, "bytes": 0, "tokens": 0}
    for t in tasks:
        if t in owners:
            row = owners[t]["splits"].get(split)
        else:
            card = card or C.load(data_dir)
            row = card["configs"][t[len(L.TASK_PREFIX):]]["splits"].get(split)
        if row is None:
            raise UserError(f"task '{t}' has no split '{split}'")
        for k in out:
            out[k] += int(row[k])
    return out


def bytes_per_token(name: str, split: str, data_dir) -> float:
    """UTF-8 bytes per token of a split: ``bpb = mean_token_loss_nats / ln(2) / bytes_per_token``."""
    s = split_stats(name, split, data_dir)
    return s["bytes"] / s["tokens"]


def task_names(data_dir) -> Sequence[str]:
    return register_tasks(data_dir)
