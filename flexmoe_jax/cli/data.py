"""``flexmoe data build`` and ``flexmoe data register``.

``flexmoe_jax.cli`` calls :func:`add_data_commands` with its subparsers; errors are raised as
ValueError / FileNotFoundError / FileExistsError / PermissionError, which the CLI prints as one line
(exit status 2). Heavy imports (TensorFlow) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_DATA_DIR = os.environ.get("FLEXMOE_DATA_DIR", "flexmoe_data")


def _cmd_build(args) -> None:
    from flexmoe_jax import data

    card = data.build(args.data_dir, domains=args.domains or None, max_docs_per_domain=args.max_docs_per_domain,
                      max_bytes_per_domain=(int(args.max_mb_per_domain * 1e6) if args.max_mb_per_domain else None),
                      vocab_size=args.vocab_size, seed=args.seed, progress=not args.no_progress,
                      install_missing=args.install_missing)
    if args.print_card:
        from flexmoe_jax.data import card as C
        print(C.markdown(card))


def _cmd_register(args) -> None:
    from flexmoe_jax import data

    data.register(args.name, args.files, args.data_dir, format=args.format, text_key=args.text_key,
                  vocab=args.vocab, overwrite=args.overwrite, progress=not args.no_progress)


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``data build`` and ``data register`` under ``subparsers`` (from ``add_subparsers``)."""
    from flexmoe_jax.data.sources import CONFIGS

    d = subparsers.add_parser("data", help="build FlexMix-mini; register an owner's own files",
                              description="Datasets: FlexMix-mini from real local corpora (tensorflow-datasets "
                                          "+ seqio), and data owners' own files.")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True

    b = dsub.add_parser(
        "build", help="build FlexMix-mini (tfds datasets, tokenizer, data card) from local corpora",
        description="Build FlexMix-mini into DATA_DIR: one tfds dataset per domain and public source, the "
                    "SentencePiece tokenizer trained on the public train split, and the data card "
                    "(DATA_DIR/card.md). Cached: re-running with the same arguments does nothing.")
    b.add_argument("--domains", nargs="+", metavar="DOMAIN",
                   help=f"configs to build (default: all): {' '.join(CONFIGS)}, or 'public' for the three "
                        "public sources (always built: the tokenizer is trained on them)")
    b.add_argument("--data_dir", default=DEFAULT_DATA_DIR,
                   help="output directory (default: $FLEXMOE_DATA_DIR or %(default)s)")
    b.add_argument("--max_docs_per_domain", type=_positive_int, default=None,
                   help="cap on documents per config, split 90/5/5 (default: no document cap)")
    b.add_argument("--max_mb_per_domain", type=float, default=None,
                   help="cap on megabytes of text per config (default: 3 MB per closed domain, 1 MB of "
                        "math, 6 MB of public text in all)")
    b.add_argument("--vocab_size", type=_positive_int, default=8192,
                   help="SentencePiece vocabulary size (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="math generation and tokenizer seed (default: 0)")
    b.add_argument("--install_missing", action="store_true",
                   help="apt-get install missing Debian source packages (needs root) instead of failing")
    b.add_argument("--no_progress", action="store_true", help="no progress bar")
    b.add_argument("--print_card", action="store_true", help="print the data card table when done")
    b.set_defaults(fn=_cmd_build)

    r = dsub.add_parser(
        "register", help="turn an owner's local files into a tfds dataset and a seqio task (on this machine)",
        description="Register local files as the tfds dataset flexmix_owner/NAME:1.0.0 and the seqio task "
                    "NAME, tokenized with the anchor's tokenizer. Nothing leaves this machine.")
    r.add_argument("--name", required=True, help="task name: lowercase letters, digits, '_'")
    r.add_argument("--files", required=True, nargs="+", metavar="GLOB",
                   help="files or glob patterns (quote them; ** recurses); directories are read recursively "
                        "(a Dolma-style tree of .json.gz shards, or a Hugging Face dataset directory)")
    r.add_argument("--format", choices=("auto", "txt", "jsonl", "parquet", "csv", "hf"), default="auto",
                   help="auto (default): by each file's name: .jsonl/.json/.ndjson (also .gz, .zst) one document "
                        "per line, .parquet and .csv/.tsv one per row, a directory saved by Hugging Face datasets "
                        "(save_to_disk) one per row, anything else one per file; or force one: txt, jsonl, "
                        "parquet, csv, hf")
    r.add_argument("--text_key", default="text",
                   help="the field (jsonl) or column (parquet, csv, hf) holding the text (default: %(default)s)")
    r.add_argument("--data_dir", default=DEFAULT_DATA_DIR,
                   help="data directory (default: $FLEXMOE_DATA_DIR or %(default)s)")
    r.add_argument("--vocab", default=None,
                   help="the anchor's spm.model (default: DATA_DIR/tokenizer/spm.model)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing registration of NAME")
    r.add_argument("--no_progress", action="store_true", help="no progress bar")
    r.set_defaults(fn=_cmd_register)
    return d
