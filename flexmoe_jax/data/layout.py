"""Where things live inside a data directory (no TensorFlow import here)."""

from __future__ import annotations

from pathlib import Path

VERSION = "1.0.0"
FLEXMIX_NAME = "flexmix_mini"  # tfds builder name of FlexMix-mini
OWNER_NAME = "flexmix_owner"  # tfds builder name of owners' data
TASK_PREFIX = "flexmix_mini."  # seqio task names: flexmix_mini.<config>
PUBLIC_MIXTURE = "flexmix_mini.public"
ALL_MIXTURE = "flexmix_mini.all"


def tfds_dir(data_dir) -> Path:
    return Path(data_dir) / "tfds"


def dataset_dir(data_dir, name: str, config: str) -> Path:
    return tfds_dir(data_dir) / name / config / VERSION


def dataset_ready(data_dir, name: str, config: str) -> bool:
    return (dataset_dir(data_dir, name, config) / "dataset_info.json").exists()


def tfds_name(name: str, config: str) -> str:
    """What seqio.TfdsDataSource wants: name/config:version (the version makes tfds read the files)."""
    return f"{name}/{config}:{VERSION}"


def tokenizer_path(data_dir) -> Path:
    return Path(data_dir) / "tokenizer" / "spm.model"


def owners_dir(data_dir) -> Path:
    return Path(data_dir) / "owners"


def cache_dir(data_dir) -> Path:
    return Path(data_dir) / "cache"
