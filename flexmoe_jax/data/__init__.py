"""FlexMix-mini: a small FlexMix built from real local corpora, through tensorflow-datasets and seqio.

The Python API (TensorFlow is imported only inside these functions, never by ``import flexmoe_jax``):

- :func:`build` (``flexmoe data build``): sources -> tfds datasets -> tokenizer -> data card, cached.
- :func:`register` (``flexmoe data register``): an owner's own files -> tfds dataset + seqio task.
- :func:`register_tasks`: register the seqio tasks / mixtures of a data directory in this process.
- :func:`vocabulary`: the anchor's ``seqio.SentencePieceVocabulary``; :func:`sentencepiece` the plain
  SentencePiece processor (no TensorFlow).
- :func:`batches`: deterministic, resumable packed training batches (dict of int32 numpy arrays).
- :func:`eval_batches`, :func:`split_stats`, :func:`bytes_per_token`, :func:`bits_per_byte`:
  tokenizer-independent evaluation.
- :func:`load_card`: the data card.

Names: tasks ``flexmix_mini.<config>`` (configs :data:`CONFIGS`), mixtures ``flexmix_mini.public`` and
``flexmix_mini.all``, and each owner's registered name. See docs/data.md.
"""

from __future__ import annotations

from flexmoe_jax.data.doc import SourceMissing
from flexmoe_jax.data.layout import ALL_MIXTURE, PUBLIC_MIXTURE, TASK_PREFIX
from flexmoe_jax.data.packing import FEATURES
from flexmoe_jax.data.sources import CLOSED_DOMAINS, CONFIGS, PUBLIC_SOURCES
from flexmoe_jax.data.splits import SPLITS


def build(data_dir, domains=None, max_docs_per_domain=None, max_bytes_per_domain=None, vocab_size=8192,
          seed=0, progress=True, install_missing=False, log=None, max_train_bytes_closed=None) -> dict:
    """Build FlexMix-mini in ``data_dir``; returns the data card. See :func:`pipeline.build`."""
    from flexmoe_jax.data import pipeline

    return pipeline.build(data_dir, domains=domains, max_docs_per_domain=max_docs_per_domain,
                          max_bytes_per_domain=max_bytes_per_domain, vocab_size=vocab_size, seed=seed,
                          progress=progress, install_missing=install_missing, log=log,
                          max_train_bytes_closed=max_train_bytes_closed)


def register(name, files, data_dir, format="auto", text_key="text", vocab=None, overwrite=False,
             progress=True, log=None) -> dict:
    """Turn an owner's local files into a tfds dataset and a seqio task; see :func:`owner.register`."""
    from flexmoe_jax.data import owner

    return owner.register(name, files, data_dir, format=format, text_key=text_key, vocab=vocab,
                          overwrite=overwrite, progress=progress, log=log)


def register_tasks(data_dir) -> list:
    """Register (idempotently) every task and mixture of ``data_dir``; returns their names."""
    from flexmoe_jax.data import tasks

    return tasks.register_tasks(data_dir)


def vocabulary(data_dir):
    """The anchor's tokenizer as a ``seqio.SentencePieceVocabulary`` (pad 0, eos 1, unk 2)."""
    from flexmoe_jax.data import layout, tokenizer

    return tokenizer.seqio_vocabulary(layout.tokenizer_path(data_dir))


def sentencepiece(data_dir):
    """The anchor's tokenizer as a ``sentencepiece.SentencePieceProcessor`` (no TensorFlow)."""
    from flexmoe_jax.data import layout, tokenizer

    return tokenizer.processor(layout.tokenizer_path(data_dir))


def batches(name, split, batch_size, seq_len, data_dir, seed=0, start_step=0, shard_index=0, num_shards=1,
            row_task=False):
    """Packed training batches of a task or mixture; resumable (``start_step`` / ``.state()``)."""
    from flexmoe_jax.data import batching

    return batching.batches(name, split, batch_size, seq_len, data_dir, seed=seed, start_step=start_step,
                         shard_index=shard_index, num_shards=num_shards, row_task=row_task)


def batches_from_state(state, data_dir):
    """Rebuild a :class:`batching.Batches` iterator from its ``state()``."""
    from flexmoe_jax.data import batching

    return batching.Batches.from_state(state, data_dir)


def eval_batches(name, split, batch_size, seq_len, data_dir):
    """Every token of a split exactly once, in padded packed batches."""
    from flexmoe_jax.data import batching

    return batching.eval_batches(name, split, batch_size, seq_len, data_dir)


def split_stats(name, split, data_dir) -> dict:
    """``{"docs", "bytes", "tokens"}`` of a task's or mixture's split (tokens include EOS)."""
    from flexmoe_jax.data import tasks

    return tasks.split_stats(name, split, data_dir)


def bytes_per_token(name, split, data_dir) -> float:
    from flexmoe_jax.data import tasks

    return tasks.bytes_per_token(name, split, data_dir)


def bits_per_byte(nll_nats, n_bytes) -> float:
    """Summed NLL in nats over all tokens of a text -> bits per UTF-8 byte of that text."""
    from flexmoe_jax.data import tokenizer

    return tokenizer.bits_per_byte(nll_nats, n_bytes)


def load_card(data_dir) -> dict:
    from flexmoe_jax.data import card

    return card.load(data_dir)


__all__ = ["build", "register", "register_tasks", "vocabulary", "sentencepiece", "batches",
           "batches_from_state", "eval_batches", "split_stats", "bytes_per_token", "bits_per_byte",
           "load_card", "CONFIGS", "CLOSED_DOMAINS", "PUBLIC_SOURCES", "SPLITS", "FEATURES",
           "PUBLIC_MIXTURE", "ALL_MIXTURE", "TASK_PREFIX", "SourceMissing"]
