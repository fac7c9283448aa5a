"""Training commands: ``train`` (any gin phase), ``train-expert`` / ``train-dense`` (one owner's run against
the anchor), ``anchor-kit`` (what owners train against) and ``routing-stats`` (an expert's token counts)."""

from __future__ import annotations

import sys


def _train_from_gin(files, bindings, workdir, platform: str | None = None, allow_cpu: bool = False) -> tuple:
    """Train the phase the gin files and bindings describe into ``workdir``; returns (RunConfig, run result)."""
    from flexmoe_jax import distributed, optim, train, trainer
    from flexmoe_jax.config import ModelConfig, gin_scope

    distributed.initialize_if_multiprocess()  # no-op for one process; before any other JAX work
    distributed.check_platform(platform, allow_cpu)

    with gin_scope(files, bindings) as gin_text:
        rc = trainer.RunConfig()
        # The anchor defines the model of later phases; a ModelConfig is checked against it only if set.
        config = ModelConfig() if rc.phase == "pretrain" or "ModelConfig." in gin_text else None
        ocfg, loss_cfg = optim.OptimConfig(), train.LossConfig()
    result = trainer.run(workdir, config, rc, ocfg, loss_cfg, gin_text=gin_text)
    m = result["metrics"]
    print(f"{rc.phase}: {rc.steps} steps on {rc.task}; final loss {m.get('loss', float('nan')):.4f} "
          f"ce {m.get('ce', float('nan')):.4f}; model -> {result['model']}")
    return rc, result


def _cmd_train(args) -> None:
    _train_from_gin(args.gin_file, args.gin_param, args.workdir, args.platform, args.allow_cpu)


def _platform_args(p) -> None:
    """Adds ``--platform`` and ``--allow_cpu`` (read by distributed.check_platform)."""
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None,
                   help="the accelerator this run is for: refuse to train when JAX runs elsewhere (e.g. the TPU or "
                        "CUDA build is not installed); the devices JAX sees are printed either way")
    p.add_argument("--allow_cpu", action="store_true", help="with --platform gpu/tpu: train on the CPU if that is all "
                                                            "JAX sees, with a warning")


def _owner_parser(sub, command: str, fn, *, help: str, lands: str, description: str | None = None) -> None:
    """A command one owner runs on its own machine against the anchor (train-expert, train-dense)."""
    x = sub.add_parser(command, help=help, description=description)
    x.add_argument("--anchor", required=True,
                   help="the public dense model checkpoint, or the builder's anchor kit (flexmoe anchor-kit)")
    x.add_argument("--task", required=True, help="this owner's seqio task, e.g. flexmix_mini.math")
    x.add_argument("--out", required=True, help=f"run directory; {lands}")
    x.add_argument("--name", default=None, help="the expert's name (default: the task's last component)")
    x.add_argument("--data_dir", default=None, help="data directory (default: RunConfig.data_dir)")
    x.add_argument("--gin_file", action="append", default=[], help="extra gin files (repeatable)")
    x.add_argument("--gin_param", action="append", default=[], help="a gin binding K=V (repeatable)")
    if command == "train-expert":
        _release_args(x)
    _platform_args(x)
    x.set_defaults(fn=fn)


def _release_args(parser) -> None:
    """``--routing_epsilon``, ``--routing_delta``, ``--exact_routing_stats``: how routing stats are released."""
    from flexmoe_jax import private_stats

    parser.add_argument("--routing_epsilon", type=float, default=private_stats.DEFAULT_EPSILON,
                        help="privacy budget of the published routing stats, per document (default %(default)s; "
                             "Gaussian mechanism, docs/privacy.md)")
    parser.add_argument("--routing_delta", type=float, default=private_stats.DEFAULT_DELTA,
                        help="the release's delta (default %(default)s)")
    parser.add_argument("--routing_seed", type=int, default=None,
                        help="seed the release's noise (reproducible runs, e.g. the demo); default: OS entropy")
    parser.add_argument("--exact_routing_stats", action="store_true",
                        help="write EXACT counts instead: they disclose which strings (names, e-mail addresses, "
                             "identifiers) the data holds; never publish them")


def _train_owner(args, phase: str):
    """Run an owner's phase from its gin file with the command line's anchor, task, name and data."""
    name = args.name or args.task.split(".")[-1]
    bindings = [f'RunConfig.phase="{phase}"', f'RunConfig.anchor="{args.anchor}"',
                f'RunConfig.task="{args.task}"', f'RunConfig.expert_name="{name}"']
    if args.data_dir:
        bindings.append(f'RunConfig.data_dir="{args.data_dir}"')
    rc, result = _train_from_gin([f"phase/{phase}.gin", *args.gin_file], bindings + list(args.gin_param), args.out,
                                 args.platform, args.allow_cpu)
    return name, rc, result


def _cmd_train_expert(args) -> None:
    name, rc, result = _train_owner(args, "expert")
    _write_routing_stats(rc, name, result["config"].vocab_size, args.out, args)


def _cmd_train_dense(args) -> None:
    _train_owner(args, "dense")


def _write_routing_stats(rc, name: str, vocab_size: int, out, args) -> None:
    """The owner's routing stats, OUT/routing_stats.npz, counted in the owner's own process from its own
    data and released with differential privacy (flexmoe_jax.private_stats) unless --exact_routing_stats."""
    import jax

    from flexmoe_jax import routing, storage

    path = storage.resolve(out) / routing.STATS_FILE  # gs:// or local, like the run directory
    if jax.process_index() != 0 or path.exists():
        return
    _publish_stats(args, rc.data_dir, rc.task, name, path, seq_len=rc.seq_len, vocab_size=vocab_size)


def _publish_stats(args, data_dir, task: str, name: str, path, **kw):
    """Write the routing stats the flags ask for to ``path`` and say what they disclose."""
    from flexmoe_jax import private_stats

    if not args.exact_routing_stats:
        kw.update(epsilon=args.routing_epsilon, delta=args.routing_delta, seed=args.routing_seed)
    stats = private_stats.publish(data_dir, task, name, exact=args.exact_routing_stats, **kw)
    stats.save(path)
    line = f"routing stats of {name} ({task}) -> {path}: {private_stats.describe(stats)}"
    print(("WARNING: " if stats.exact else "") + line, file=sys.stderr if stats.exact else sys.stdout)
    return stats


def _cmd_anchor_kit(args) -> None:
    from flexmoe_jax import anchor_kit

    out = anchor_kit.build(args.anchor, args.data_dir, args.out, method=args.router_init,
                           public_task=args.public_task, seq_len=args.seq_len, num_docs=args.docs,
                           num_batches=args.batches, seed=args.seed)
    kit = anchor_kit.open_kit(out)
    print(f"anchor kit {kit.kit_id[:16]}... (router init {kit.method}) -> {out}; owners train with "
          f"`flexmoe train-expert --anchor {out}`, the builder merges with `flexmoe merge --anchor {out}`")


def _cmd_routing_stats(args) -> None:
    name = args.name or args.task.split(".")[-1]
    _publish_stats(args, args.data_dir, args.task, name, args.out, split=args.split, max_tokens=args.max_tokens)


def add_parsers(sub) -> None:
    """Adds ``train``, ``train-expert``, ``train-dense``, ``anchor-kit``, ``routing-stats`` to the subparsers."""
    t = sub.add_parser("train", help="train any phase described by gin files (t5x style)")
    t.add_argument("--gin_file", action="append", default=[], required=True,
                   help="gin file (repeatable); names are also looked up under gin_configs/, e.g. phase/pretrain.gin")
    t.add_argument("--gin_param", action="append", default=[], help="a gin binding K=V (repeatable)")
    t.add_argument("--workdir", required=True, help="run directory: resumable state, metrics, final model")
    _platform_args(t)
    t.set_defaults(fn=_cmd_train)

    _owner_parser(sub, "train-expert", _cmd_train_expert, help="one owner's coordinated independent expert training",
                  lands="the expert lands in OUT/model, its deliverable in OUT/expert")
    _owner_parser(sub, "train-dense", _cmd_train_dense,
                  help="one owner's dense expert: the whole anchor continued on its own data",
                  description="The paper's dense experts (its soup, BTM and BTX baselines are built from them): "
                              "every parameter of the anchor trains on the owner's data only, in the owner's "
                              "process, with expert training's recipe (phase/dense.gin).",
                  lands="the dense expert lands in OUT/model")

    k = sub.add_parser("anchor-kit", help="publish an anchor with its public router row and public routing stats",
                       description="What every owner trains against (flexmoe_jax.anchor_kit): the anchor, one "
                                   "public router row and the router-init method (and for 'embedder'/'minilm' the "
                                   "fixed embedding map), the public token counts; from public data only.")
    k.add_argument("--anchor", required=True, help="the dense public model checkpoint")
    k.add_argument("--data_dir", required=True, help="data directory with the public data and the tokenizer")
    k.add_argument("--out", required=True, help="the kit directory to write (atomically)")
    k.add_argument("--router_init", default="hidden", choices=("hidden", "embedder", "minilm", "zeros", "random"),
                   help="how owners' router rows are made (default %(default)s; 'embedder' is the paper's recipe)")
    k.add_argument("--public_task", default="flexmix_mini.public")
    k.add_argument("--seq_len", type=int, default=128)
    k.add_argument("--docs", type=int, default=256, help="public documents the embedding map is fitted on")
    k.add_argument("--batches", type=int, default=8, help="public batches of 16 rows the 'hidden' row averages")
    k.add_argument("--seed", type=int, default=0)
    k.set_defaults(fn=_cmd_anchor_kit)

    rs = sub.add_parser("routing-stats", help="an expert's routing stats for domain routing, released with DP",
                        description="Writes OUT (.npz): the unigram counts and hashed pair sketch of TASK's split "
                                    "in DATA_DIR, named NAME, released through the Gaussian mechanism at "
                                    "(--routing_epsilon, --routing_delta) per document (flexmoe_jax.private_stats). "
                                    "An owner runs it on its own data; the model builder on the public data for "
                                    "the public expert (the same mechanism keeps the experts' models comparable).")
    rs.add_argument("--data_dir", required=True, help="the data directory holding the task")
    rs.add_argument("--task", required=True, help="the task, e.g. flexmix_mini.math or flexmix_mini.public")
    rs.add_argument("--name", default=None, help="the expert's name (default: the task's last component)")
    rs.add_argument("--split", default="train", help="split to count (default %(default)s)")
    rs.add_argument("--max_tokens", type=int, default=None, help="count a seeded sample of about this many tokens")
    rs.add_argument("--out", required=True, help="the .npz file to write")
    _release_args(rs)
    rs.set_defaults(fn=_cmd_routing_stats)
