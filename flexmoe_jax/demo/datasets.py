"""The demo's data: FlexMix-mini built once, then one directory per owner holding only what it may read."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flexmoe_jax import storage
from flexmoe_jax.demo.plan import DemoError
from flexmoe_jax.demo.workdir import Workdir, log


def build_data(w: Workdir) -> None:
    """FlexMix-mini in ``w.data`` at the plan's size; DemoError when a local corpus is missing."""
    from flexmoe_jax import data

    try:
        data.build(w.data, max_docs_per_domain=w.plan.max_docs_per_domain, vocab_size=w.plan.vocab_size,
                   max_train_bytes_closed=w.plan.max_train_bytes_closed, progress=True, log=lambda m: log(f"   {m}"))
    except data.SourceMissing as e:
        raise DemoError(f"{e}; install the corpora with `bash .ci/install_data_sources.sh` (needs root)") from None


def owner_data_dir(data_dir: str | os.PathLike, domain: str, out: str | os.PathLike) -> Path:
    """A data directory with only the public sources and ``domain``: what one owner may read.

    Datasets are hard links into ``data_dir`` (copies where links are impossible); the manifest
    and data card list only what is there, so the owner's expert records a card of its own data.
    An existing ``out`` is returned as it is.
    """
    from flexmoe_jax import data
    from flexmoe_jax.data import card as card_lib, layout as L, pipeline

    src, out = Path(data_dir), Path(out)
    if out.exists():
        return out
    keep = [*data.PUBLIC_SOURCES, domain]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(L.tokenizer_path(src).parent, L.tokenizer_path(tmp).parent)
    manifest = pipeline.read_manifest(src)
    manifest["configs"] = {c: v for c, v in manifest["configs"].items() if c in keep}
    storage.write_json(tmp / pipeline.MANIFEST, manifest)
    card = card_lib.load(src)
    card["configs"] = {c: v for c, v in card["configs"].items() if c in keep}
    card["data_dir"] = str(out.resolve())
    card_lib.write(tmp, card)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    for c in keep:
        shutil.copytree(L.dataset_dir(src, L.FLEXMIX_NAME, c), L.dataset_dir(tmp, L.FLEXMIX_NAME, c),
                        copy_function=link)
    os.replace(tmp, out)
    return out


def share_public_rows(w: Workdir, domains: list[str]) -> None:
    """Hard-link the public sources' packed training rows the anchor's run made into each owner's
    data directory (public data only), so no owner process packs the same public text again."""
    from flexmoe_jax import data
    from flexmoe_jax.data import packing

    public = [f"{data.TASK_PREFIX}{c}" for c in data.PUBLIC_SOURCES]
    for d in domains:
        packing.share_packed_rows(w.data, w.owner_data(d), public, "train", w.plan.seq_len)
