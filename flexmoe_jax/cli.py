"""The ``flexmoe`` command line.

Every command prints a one-line error and exits non-zero on bad input; heavy
imports happen inside the command so ``flexmoe --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


class CommandError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def _cmd_import_hf(args) -> None:
    from flexmoe_jax import checkpoint, hf

    config, params = hf.from_hf(args.src, dtype=args.dtype)
    checkpoint.save(args.out, config, params, metadata={"source": "hf", "hf_path": str(args.src)})
    kind = f"FlexOlmo MoE with experts {list(config.names)}, top-{config.top_k}" if config.is_moe else "dense OLMo-2"
    print(f"imported {kind} ({config.num_params():,} params) from {args.src} -> {args.out}")


def _cmd_export_hf(args) -> None:
    from flexmoe_jax import checkpoint, hf

    config, params = checkpoint.load(args.ckpt)
    hf.to_hf(config, params, args.out, max_shard_size=args.max_shard_size)
    print(f"exported {args.ckpt} -> {args.out} ({'FlexOlmoForCausalLM' if config.is_moe else 'Olmo2ForCausalLM'})")


def _cmd_info(args) -> None:
    from flexmoe_jax import checkpoint

    config = checkpoint.load_config(args.ckpt)
    print(config.to_json())
    if config.is_moe:
        print(f"experts (slot order): {list(config.names)}; top_k={config.top_k}")
    print(f"parameters: {config.num_params():,}")


def _cmd_demo(args) -> None:
    from flexmoe_jax import demo

    demo.run(args.workdir, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexmoe",
        description="FlexOlmo-style mixture-of-experts in JAX: independently trained experts, "
                    "merged, switchable at inference.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="run the end-to-end demo on this machine")
    d.add_argument("--quick", action="store_true", help="smallest sizes; finishes in about a minute")
    d.add_argument("--workdir", default="flexmoe_demo", help="where checkpoints and results go (default: %(default)s)")
    d.set_defaults(fn=_cmd_demo)

    i = sub.add_parser("import-hf", help="HF FlexOlmoForCausalLM / Olmo2ForCausalLM directory -> Orbax checkpoint")
    i.add_argument("src", help="directory with config.json and model.safetensors (or a sharded index)")
    i.add_argument("out", help="output checkpoint directory (written atomically)")
    i.add_argument("--dtype", default=None, help="cast parameters to this dtype (default: keep stored dtype)")
    i.set_defaults(fn=_cmd_import_hf)

    e = sub.add_parser("export-hf", help="Orbax checkpoint -> HF transformers directory")
    e.add_argument("ckpt", help="checkpoint directory written by flexmoe")
    e.add_argument("out", help="output directory for config.json + safetensors (written atomically)")
    e.add_argument("--max_shard_size", default=None,
                   help='split weights into shards of at most this size, e.g. "5GB" (default: one file)')
    e.set_defaults(fn=_cmd_export_hf)

    n = sub.add_parser("info", help="print a checkpoint's config and experts")
    n.add_argument("ckpt")
    n.set_defaults(fn=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (CommandError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"flexmoe {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
