"""The ``flexmoe`` command line: :func:`build_parser` assembles one module per command group; :func:`main` runs one.

Every command prints a one-line error and exits with status 2 on bad input (a FlexmoeError or an
OSError); heavy imports happen inside the command so ``flexmoe --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from flexmoe_jax import storage
from flexmoe_jax.cli import demo, evaluation, generation, huggingface, inspection, merging, training
from flexmoe_jax.cli.common import CommandError
from flexmoe_jax.errors import FlexmoeError

__all__ = ["CommandError", "build_parser", "main"]

# In the order ``flexmoe --help`` lists their commands; ``data`` (cli.data) comes last.
_GROUPS = (demo, training, merging, evaluation, huggingface, generation, inspection)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexmoe",
        description="FlexOlmo-style mixture-of-experts in JAX: independently trained experts, "
                    "merged, switchable at inference.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in _GROUPS:
        group.add_parsers(sub)

    from flexmoe_jax.cli.data import add_data_commands

    add_data_commands(sub)
    return p


def _close_progress_bars() -> None:
    """End any progress bar a failed command left open, so its error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for a user error, printed as one line)."""
    from flexmoe_jax import tf_quiet

    tf_quiet.install()  # TensorFlow (the data pipeline's engine) prints C++ lines on import
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["privacy", "audit"]:  # `flexmoe privacy audit` is the privacy-audit command
        argv = ["privacy-audit", *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "data_dir", None) and args.command != "data" and storage.is_remote(args.data_dir):
            from flexmoe_jax.data import staging

            args.data_dir = staging.stage(args.data_dir, log=lambda m: print(m, file=sys.stderr))
        if "public" in (getattr(args, "exclude", None) or ()):
            print(f"flexmoe {args.command}: warning: --exclude public opts out the public expert, the anchor's own "
                  "FFN that every owner's expert was trained beside (top-2 of {public, own}): the owners' experts "
                  "then run without the half of the mixture their training assumed, on every domain",
                  file=sys.stderr)
        status = args.fn(args)
    except (FlexmoeError, OSError) as e:  # bad input, or a missing / unwritable file: one line, status 2
        _close_progress_bars()
        print(f"flexmoe {args.command}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT (writes are atomic)
        _close_progress_bars()
        print(f"flexmoe {args.command}: interrupted; nothing half-written was left in place", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0  # anything else is a bug: its traceback shows
