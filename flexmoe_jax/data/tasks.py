"""seqio Tasks and Mixtures of a data directory: FlexMix-mini's configs, its mixtures, owners' data.

Tasks ``flexmix_mini.<config>`` and each owner's name read the tfds dataset and tokenize, append EOS
and cut every document into pieces of at most ``sequence_length["targets"]`` tokens (nothing is
truncated away). Mixtures ``flexmix_mini.public`` and ``flexmix_mini.all`` weight tasks by training
tokens. Packing is :mod:`flexmoe_jax.data.packing`, batches :mod:`flexmoe_jax.data.batching`; see
docs/data.md.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from flexmoe_jax.data import card as C, layout as L, sources as S
from flexmoe_jax.data.manifest import read_manifest
from flexmoe_jax.data.tfds_io import quiet_tf
from flexmoe_jax.errors import UserError

# name -> (data_dir, key) of every task/mixture this module registered in this process.
_REGISTERED: dict[str, tuple[str, str]] = {}


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
    quiet_tf()
    data_dir = L.root(data_dir).resolve()
    manifest = read_manifest(data_dir)
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
    quiet_tf()
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


def split_stats(name: str, split: str, data_dir) -> dict[str, int]:
    """Documents, UTF-8 bytes and tokens (with one EOS per document) of a task's or mixture's split."""
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
