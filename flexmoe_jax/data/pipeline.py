"""``flexmoe_jax.data.build``: sources -> tfds datasets -> tokenizer -> data card, each step cached
by a key in the manifest (a step whose key matches is skipped). Layout and caching: docs/data.md."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from flexmoe_jax.data import card as C, layout as L, sources as S, splits, tokenizer as T
from flexmoe_jax.data.manifest import FORMAT_VERSION, MANIFEST, read_manifest
from flexmoe_jax.data.tfds_io import quiet_tf, read_split_texts
from flexmoe_jax.errors import UserError
from flexmoe_jax.storage import write_json

DEFAULT_VOCAB_SIZE = 8192
# Per-config byte caps for the full build ("a few MB per domain"; math is generated, ~10 KB/s/core).
DEFAULT_MAX_BYTES = {
    "code": 3_000_000, "math": 1_000_000, "literature": 3_000_000, "humor": 3_000_000,
    "techdocs": 3_000_000, "public_gcide": 3_000_000, "public_wordnet": 2_000_000,
    "public_foldoc": 1_000_000,
}
# Test splits under the default caps: every comparison is judged on them and held-out text costs
# no training time, so each closed source keeps every document its hash puts in test (math, which is
# generated, 250 KB: ~330 worksheets), not just 5% of the cap. Train and validation are unchanged.
DEFAULT_TEST_BYTES = {"code": None, "techdocs": None, "literature": None, "humor": None, "math": 250_000}


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_args(config: str, max_docs: int | None, max_bytes: int | None, seed: int,
                max_train_bytes_closed: int | None = None) -> dict:
    cap = max_bytes if max_bytes is not None else DEFAULT_MAX_BYTES[config]
    args = {"format": FORMAT_VERSION, "config": config, "max_docs": max_docs, "max_bytes": cap,
            "seed": seed if config == "math" else None, "packages": S.package_versions(config)}
    if max_train_bytes_closed is not None and config in S.CLOSED_DOMAINS:
        args["train_bytes"] = max_train_bytes_closed
    if max_bytes is None and config in DEFAULT_TEST_BYTES:
        args["test_bytes"] = DEFAULT_TEST_BYTES[config]
    if config in S.PUBLIC_SOURCES:
        args["decontaminate_against"] = {c: S.package_versions(c) for c in S.DECONTAMINATE_AGAINST}
    return args


def decontamination_index() -> splits.NgramIndex:
    """13-gram index of the closed corpora (full sources, not just the selected slices), cached in
    the tools directory (``~/.cache/flexmoe_jax/tools``) since it depends only on the packages."""
    import numpy as np

    from flexmoe_jax.data import mathgen

    key = _key({c: S.package_versions(c) for c in S.DECONTAMINATE_AGAINST} | {"n": splits.NGRAM})
    path = mathgen.tools_dir() / f"decontam-{key}.npy"  # depends only on the installed packages
    if path.exists():
        return splits.NgramIndex(np.load(path), sorted_unique=True)
    texts = (t for c in S.DECONTAMINATE_AGAINST for t in splits.iter_texts(S.documents(c)))
    index = splits.NgramIndex.from_texts(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, index.hashes)
    os.replace(tmp, path)
    return index


def _selection_fn(args: dict, tick: Callable[[int], None]):
    def select(config: str) -> splits.Selection:
        max_docs, max_bytes = args["max_docs"], args["max_bytes"]
        test_bytes, train_bytes = args.get("test_bytes", splits.SHARE), args.get("train_bytes")
        if config == "math":
            from flexmoe_jax.data import mathgen

            with mathgen.Generator(args["seed"]) as g:
                def gen(split, n, b):
                    for i, d in enumerate(g.docs(split, max_docs=n, max_bytes=b)):
                        tick(i + 1)
                        yield d
                return splits.select_generated(gen, max_docs, max_bytes, test_bytes, train_bytes)
        exclude = decontamination_index() if config in S.PUBLIC_SOURCES else None
        return splits.select(S.documents(config), max_docs, max_bytes, exclude=exclude,
                             test_bytes=test_bytes, train_bytes=train_bytes)
    return select


def build_config(data_dir, config: str, args: dict, tick=lambda n: None) -> dict:
    """Build one FlexMix-mini config into DATA_DIR/tfds (replacing an older build); returns its stats."""
    quiet_tf()
    import tensorflow_datasets as tfds

    from flexmoe_jax.data import builder as B

    tfds.disable_progress_bar()
    target = L.dataset_dir(data_dir, L.FLEXMIX_NAME, config)
    if target.exists():
        shutil.rmtree(target)
    b = B.FlexmixMini(config=config, data_dir=str(L.tfds_dir(data_dir)), selection_fn=_selection_fn(args, tick),
                      metadata={"build_key": _key(args)})
    b.download_and_prepare(download_dir=str(L.cache_dir(data_dir) / "downloads"),
                           download_config=B.download_config())
    sel = dict(b.info.metadata.get("selection", {}))
    counts = {s: int(b.info.splits[s].num_examples) for s in splits.SPLITS if s in b.info.splits}
    return {"selection": sel, "docs": counts}


def build(data_dir, domains: Sequence[str] | None = None, max_docs_per_domain: int | None = None,
          max_bytes_per_domain: int | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0,
          progress: bool = True, install_missing: bool = False, log: Callable[[str], None] | None = None,
          max_train_bytes_closed: int | None = None) -> dict:
    """Build FlexMix-mini into ``data_dir`` and return its data card (a dict; also card.json/card.md).

    Args:
      data_dir: where everything goes (created if needed).
      domains: configs to build: any of ``code math literature humor techdocs``, ``public`` or a
        single public source (``public_gcide``, ``public_wordnet``, ``public_foldoc``). Default: all.
        The public sources are always built: the tokenizer is trained on them.
      max_docs_per_domain: cap on documents per config (split 90/5/5, at least 1 per split).
      max_bytes_per_domain: cap on UTF-8 bytes per config; default :data:`DEFAULT_MAX_BYTES`.
      max_train_bytes_closed: cap on the UTF-8 bytes of each closed domain's *train* split (its
        validation and test splits unchanged): owners whose data is small beside the public data.
      vocab_size: SentencePiece vocabulary size (the model's ``vocab_size`` must equal it).
      seed: math generation and tokenizer training seed (splits depend only on content).
      progress: show a progress bar on stderr.
      install_missing: apt-get install missing Debian packages (needs root) instead of failing.
      log: where one-line status messages go (default: print to stdout).

    Raises :class:`UserError` on bad caps or an unknown domain, :class:`SourceMissing` for a corpus
    that is not installed.
    """
    log = log or (lambda msg: print(msg, flush=True))
    _check_args(max_docs_per_domain, max_bytes_per_domain, vocab_size)
    if max_train_bytes_closed is not None and max_train_bytes_closed <= 0:
        raise UserError("max_train_bytes_closed must be positive")
    configs = S.check_configs(list(domains) if domains else list(S.CONFIGS))
    configs = [c for c in S.CONFIGS if c in set(configs) | set(S.PUBLIC_SOURCES)]
    data_dir = Path(data_dir)
    S.package_versions.cache_clear()
    manifest = read_manifest(data_dir)
    built = manifest.setdefault("configs", {})
    args, todo = _plan(data_dir, configs, built, max_docs_per_domain, max_bytes_per_domain, seed, install_missing,
                       max_train_bytes_closed)

    tok_args = {"vocab_size": vocab_size, "seed": seed, "public": {c: _key(args[c]) for c in S.PUBLIC_SOURCES}}
    tok_path = L.tokenizer_path(data_dir)
    tok_stale = manifest.get("tokenizer", {}).get("key") != _key(tok_args) or not tok_path.exists()
    if (not todo and not tok_stale and manifest.get("card_key") == _card_key(built, tok_args)
            and (data_dir / "card.json").exists()):
        log(f"FlexMix-mini in {data_dir} is up to date (same arguments): nothing to do")
        return C.load(data_dir)

    from tqdm.auto import tqdm

    data_dir.mkdir(parents=True, exist_ok=True)
    steps = len(todo) + int(tok_stale or bool(todo)) + 1
    bar = tqdm(total=steps, desc="flexmix build", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        _build_configs(data_dir, todo, args, manifest, bar)
        if tok_stale or todo:
            _train_tokenizer(data_dir, manifest, tok_args, bar)
        for c in todo:
            shutil.rmtree(L.cache_dir(data_dir) / "packed" / f"{L.TASK_PREFIX}{c}", ignore_errors=True)
        card = _write_card(data_dir, manifest, tok_args, bar)
    finally:
        bar.close()
    log(f"built FlexMix-mini in {data_dir}: " + ", ".join(todo or ["(tokenizer/card only)"])
        + f"; card: {data_dir / 'card.md'}")
    return card


def _check_args(max_docs_per_domain: int | None, max_bytes_per_domain: int | None, vocab_size: int) -> None:
    if max_docs_per_domain is not None and max_docs_per_domain < 3:
        raise UserError("max_docs_per_domain must be at least 3 (one document per split)")
    if max_bytes_per_domain is not None and max_bytes_per_domain <= 0:
        raise UserError("max_bytes_per_domain must be positive")
    if vocab_size < 260:
        raise UserError("vocab_size must be at least 260 (256 byte-fallback pieces + specials)")


def _plan(data_dir: Path, configs: list[str], built: dict, max_docs: int | None, max_bytes: int | None, seed: int,
          install_missing: bool, train_bytes: int | None = None) -> tuple[dict[str, dict], list[str]]:
    """``(args per config, configs to (re)build)``; makes sure the corpora of those are installed."""
    def stale(c, args):
        entry = built.get(c)
        return not (entry and entry.get("key") == _key(args) and L.dataset_ready(data_dir, L.FLEXMIX_NAME, c))

    args = {c: config_args(c, max_docs, max_bytes, seed, train_bytes) for c in configs}
    todo = [c for c in configs if stale(c, args[c])]
    if todo:
        need = set(todo) | (set(S.DECONTAMINATE_AGAINST) if set(todo) & set(S.PUBLIC_SOURCES) else set())
        S.ensure_available([c for c in S.CONFIGS if c in need], install_missing=install_missing)
        S.package_versions.cache_clear()
        args = {c: config_args(c, max_docs, max_bytes, seed, train_bytes) for c in configs}
        todo = [c for c in configs if stale(c, args[c])]
    return args, todo


def _card_key(built: dict, tok_args: dict) -> str:
    return _key({"configs": {c: e["key"] for c, e in built.items()}, "tokenizer": _key(tok_args), "card_format": 1})


def _build_configs(data_dir: Path, todo: list[str], args: dict[str, dict], manifest: dict, bar) -> None:
    """Build each stale config's tfds dataset, recording it in the manifest after each."""
    built = manifest["configs"]
    for c in todo:
        bar.set_description(f"build {c}")

        def tick(n, c=c):
            if n % 25 == 0:
                bar.set_postfix_str(f"{c}: {n} docs generated", refresh=True)
        t0 = time.time()
        info = build_config(data_dir, c, args[c], tick)
        built[c] = {"key": _key(args[c]), "args": args[c], **info, "seconds": round(time.time() - t0, 1)}
        manifest["card_key"] = None
        write_json(data_dir / MANIFEST, manifest)
        bar.set_postfix_str("")
        bar.update(1)


def _train_tokenizer(data_dir: Path, manifest: dict, tok_args: dict, bar) -> None:
    """Train the tokenizer on the public train split; drop the packed rows if it changed."""
    bar.set_description("train tokenizer")
    vocab_size, seed = tok_args["vocab_size"], tok_args["seed"]
    tok_path = L.tokenizer_path(data_dir)
    public_train = [t for c in S.PUBLIC_SOURCES for t in read_split_texts(data_dir, L.FLEXMIX_NAME, c, "train")]
    old = tok_path.read_bytes() if tok_path.exists() else None
    T.train(public_train, tok_path, vocab_size=vocab_size, seed=seed)
    if old != tok_path.read_bytes():
        shutil.rmtree(L.cache_dir(data_dir) / "packed", ignore_errors=True)
    manifest["tokenizer"] = {"key": _key(tok_args), "vocab_size": vocab_size, "seed": seed,
                             "trained_on": [f"flexmix_mini/{c}:train" for c in S.PUBLIC_SOURCES],
                             "model_type": "bpe", "byte_fallback": True}
    write_json(data_dir / MANIFEST, manifest)
    bar.update(1)


def _write_card(data_dir: Path, manifest: dict, tok_args: dict, bar) -> dict:
    """Measure every built config into the data card, write it, and record its key."""
    bar.set_description("data card")
    built = manifest["configs"]
    card = C.compute(data_dir, [c for c in S.CONFIGS if c in built], manifest)
    C.write(data_dir, card)
    manifest["card_key"] = _card_key(built, tok_args)
    write_json(data_dir / MANIFEST, manifest)
    bar.update(1)
    return card
