"""The ``flexmoe`` command line.

Every command prints a one-line error and exits non-zero on bad input; heavy
imports happen inside the command so ``flexmoe --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
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


def _train_from_gin(files, bindings, workdir) -> None:
    from flexmoe_jax import distributed, optim, train, trainer
    from flexmoe_jax.config import ModelConfig, gin_scope

    distributed.initialize_if_multiprocess()  # no-op for one process; before any other JAX work

    with gin_scope(files, bindings) as gin_text:
        rc = trainer.RunConfig()
        # The anchor defines the model of later phases; a ModelConfig is checked against it only if set.
        config = ModelConfig() if rc.phase == "pretrain" or "ModelConfig." in gin_text else None
        ocfg, loss_cfg = optim.OptimConfig(), train.LossConfig()
    result = trainer.run(workdir, config, rc, ocfg, loss_cfg, gin_text=gin_text)
    m = result["metrics"]
    print(f"{rc.phase}: {rc.steps} steps on {rc.task}; final loss {m.get('loss', float('nan')):.4f} "
          f"ce {m.get('ce', float('nan')):.4f}; model -> {result['model']}")


def _cmd_train(args) -> None:
    _train_from_gin(args.gin_file, args.gin_param, args.workdir)


def _cmd_train_expert(args) -> None:
    name = args.name or args.task.split(".")[-1]
    bindings = [f'RunConfig.phase="expert"', f'RunConfig.anchor="{args.anchor}"',
                f'RunConfig.task="{args.task}"', f'RunConfig.expert_name="{name}"']
    if args.data_dir:
        bindings.append(f'RunConfig.data_dir="{args.data_dir}"')
    _train_from_gin(["phase/expert.gin", *args.gin_file], bindings + list(args.gin_param), args.out)


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

    t = sub.add_parser("train", help="train any phase described by gin files (t5x style)")
    t.add_argument("--gin_file", action="append", default=[], required=True,
                   help="gin file (repeatable); names are also looked up under gin_configs/, e.g. phase/pretrain.gin")
    t.add_argument("--gin_param", action="append", default=[], help="a gin binding K=V (repeatable)")
    t.add_argument("--workdir", required=True, help="run directory: resumable state, metrics, final model")
    t.set_defaults(fn=_cmd_train)

    x = sub.add_parser("train-expert", help="one owner's coordinated independent expert training")
    x.add_argument("--anchor", required=True, help="the public dense model checkpoint")
    x.add_argument("--task", required=True, help="this owner's seqio task, e.g. flexmix_mini.math")
    x.add_argument("--out", required=True, help="run directory; the expert lands in OUT/model")
    x.add_argument("--name", default=None, help="the expert's name (default: the task's last component)")
    x.add_argument("--data_dir", default=None, help="data directory (default: RunConfig.data_dir)")
    x.add_argument("--gin_file", action="append", default=[], help="extra gin files (repeatable)")
    x.add_argument("--gin_param", action="append", default=[], help="a gin binding K=V (repeatable)")
    x.set_defaults(fn=_cmd_train_expert)

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

    from flexmoe_jax.data_cli import add_data_commands

    add_data_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow (data pipeline only) is chatty
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (CommandError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        msg = " ".join(str(msg).split("\n"))  # gin appends the call site on a second line
        print(f"flexmoe {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
