"""Where things live inside a data directory (no TensorFlow import here)."""

from __future__ import annotations

from pathlib import Path

from flexmoe_jax.errors import UserError

VERSION = "1.0.0"
FLEXMIX_NAME = "flexmix_mini"  # tfds builder name of FlexMix-mini
OWNER_NAME = "flexmix_owner"  # tfds builder name of owners' data
TASK_PREFIX = "flexmix_mini."  # seqio task names: flexmix_mini.<config>
PUBLIC_MIXTURE = "flexmix_mini.public"
ALL_MIXTURE = "flexmix_mini.all"


def root(data_dir) -> Path:
    """``data_dir`` as a local path. The tokenizer (SentencePiece) and the prepared files are read from
    a local disk: commands stage a bucket URL first (:mod:`flexmoe_jax.data.staging`); here one is
    refused with the fix."""
    if str(data_dir).startswith(("gs://", "s3://")):
        raise UserError(f"--data_dir {data_dir}: the data directory must be a local path here (SentencePiece and "
                        f"the prepared dataset files are read locally); stage it with "
                        f"flexmoe_jax.data.staging.stage({str(data_dir)!r}) (commands do so themselves), or copy "
                        f"it: gsutil -m cp -r {data_dir} /tmp/flexmix_data")
    return Path(data_dir)


def tfds_dir(data_dir) -> Path:
    return root(data_dir) / "tfds"


def dataset_dir(data_dir, name: str, config: str) -> Path:
    return tfds_dir(data_dir) / name / config / VERSION


def dataset_ready(data_dir, name: str, config: str) -> bool:
    return (dataset_dir(data_dir, name, config) / "dataset_info.json").exists()


def tfds_name(name: str, config: str) -> str:
    """What seqio.TfdsDataSource wants: name/config:version (the version makes tfds read the files)."""
    return f"{name}/{config}:{VERSION}"


def tokenizer_path(data_dir) -> Path:
    return root(data_dir) / "tokenizer" / "spm.model"


def owners_dir(data_dir) -> Path:
    return root(data_dir) / "owners"


def cache_dir(data_dir) -> Path:
    return root(data_dir) / "cache"
