"""TensorFlow for the data package: imported quietly and kept off the GPU; prepared tfds datasets read back."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def quiet_tf() -> None:
    """Quiet TF's Python logging, and keep TF off any GPU (JAX owns the accelerators)."""
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialized
        pass


def read_split_texts(data_dir, name: str, config: str, split: str) -> list[str]:
    """All document texts of one split of a prepared dataset, in storage order."""
    quiet_tf()
    import tensorflow_datasets as tfds

    from flexmoe_jax.data import builder as B

    b = B.load_builder(data_dir, name, config)
    if split not in b.info.splits:
        return []
    ds = b.as_dataset(split=split, shuffle_files=False)
    return [x["text"].decode("utf-8") for x in tfds.as_numpy(ds)]
