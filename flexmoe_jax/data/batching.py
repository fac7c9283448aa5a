"""Training batches (deterministic, resumable from ``(seed, step)``) and evaluation batches (every
packed row once) of a task or mixture; see docs/data.md for the schedule."""

from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np

from flexmoe_jax.data.packing import FEATURES, packed_rows
from flexmoe_jax.data.tasks import _tasks_and_rates
from flexmoe_jax.errors import UserError

_BLOCK = 1024  # steps per block of mixture draws


def _stable_id(name: str) -> int:
    return zlib.crc32(name.encode())


class Batches:
    """Infinite, deterministic, resumable training batches (the schedule: docs/data.md).

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
