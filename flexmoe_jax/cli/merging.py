"""Building the merged model: ``merge`` (anchor + experts -> one MoE), ``tune-router`` and ``calibrate``
(optional router adjustments on public data)."""

from __future__ import annotations

import os

from flexmoe_jax.cli.common import CommandError


def _cmd_merge(args) -> None:
    from flexmoe_jax import checkpoint, loading, merge, storage

    target = storage.resolve(args.out)
    if (target / checkpoint.MARKER_NAME).exists() and not args.overwrite:
        raise CommandError(f"--out {args.out} already holds a model ({checkpoint.kind(target)}); pass --overwrite to "
                           "replace it (the new one appears only once complete), or choose another --out")
    out = merge.merge(args.anchor, args.expert, args.out, top_k=args.top_k, names=args.names,
                      keep_bias=not args.drop_bias, public_router=args.public_router, progress=True,
                      routing_stats=_name_files(args.routing_stats, "--routing_stats"), routing=args.routing)
    cfg = checkpoint.load_config(out)
    size = sum(storage.size(f) for f in storage.files(out))
    print(f"merged experts [{', '.join(cfg.names)}], top-{cfg.top_k}, bias {loading.read_manifest(out)['bias']} "
          f"({cfg.num_params():,} params, {size / 1e6:.1f} MB) -> {out}")


def _name_files(pairs, flag: str) -> dict[str, str]:
    """``NAME=FILE`` arguments -> {NAME: FILE}."""
    out = {}
    for pair in pairs or ():
        name, sep, f = pair.partition("=")
        if not sep or not name or not f:
            raise CommandError(f"{flag} takes NAME=FILE, got {pair!r}")
        out[name] = f
    return out


def _cmd_tune_router(args) -> None:
    from flexmoe_jax import router_tune

    result = router_tune.tune(args.ckpt, args.out, args.data_dir, gin_files=args.gin_file, gin_params=args.gin_param,
                              top_k=args.top_k, per_expert=args.per_expert, public=args.public, pool=args.pool,
                              include=args.include, exclude=args.exclude, progress=True)
    m, proxy = result["metrics"], result["proxy"]
    print(f"router tuned on {proxy['total_docs']} proxy documents ({proxy['task']}); final loss "
          f"{m.get('loss', float('nan')):.4f}; model -> {result['model']}")


def _cmd_calibrate(args) -> None:
    import json

    from flexmoe_jax import checkpoint, data, loading, router_tune

    config, params = loading.load(args.ckpt, include=args.include, exclude=args.exclude)
    data.register_tasks(args.data_dir)
    batches = data.batches(data.PUBLIC_MIXTURE, "train", args.batch_size, args.seq_len, args.data_dir, seed=args.seed)
    if args.quantile is not None and not 0 < args.quantile < 1:
        raise CommandError(f"--quantile must be between 0 and 1, got {args.quantile}")
    config, params, report = router_tune.calibrate_bias(config, params, batches, num_batches=args.batches,
                                                        quantile=args.quantile)
    checkpoint.save(args.out, config, params, metadata={"calibrated_from": os.path.abspath(args.ckpt),
                                                         "calibration": report})
    worst = max(max(row[1:]) for row in report["margin_before"])
    print(f"calibrated {list(config.names)} on {args.batches} public batches (largest margin over public "
          f"{worst:+.3f} -> {max(max(r[1:]) for r in report['margin_after']):+.3f}); model -> {args.out}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)


def add_parsers(sub) -> None:
    """Adds ``merge``, ``tune-router``, ``calibrate`` to the ``flexmoe`` subparsers ``sub``."""
    from flexmoe_jax.config import ROUTINGS

    m = sub.add_parser("merge", help="merge independently trained experts and their public anchor into one MoE",
                       description="Every shared tensor and expert slot 0 (public) come from the anchor; each "
                                   "expert's slot, router row and bias are stacked after it in the order given. "
                                   "Every input is checked (anchor fingerprint, architecture, frozen tensors, "
                                   "names, shapes, checksums); OUT appears, complete, only if every check "
                                   "passed.")
    m.add_argument("--anchor", required=True, help="the dense public model checkpoint the experts were trained against")
    m.add_argument("--expert", action="extend", nargs="+", required=True, metavar="DIR",
                   help="an expert, in slot order (repeatable, or several after one flag): its deliverable "
                        "WORKDIR/expert, its run directory WORKDIR, or its full model WORKDIR/model")
    m.add_argument("--out", required=True, help="output directory of the merged model (written atomically)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace a model already at --out (refused otherwise)")
    m.add_argument("--top_k", type=int, default=None,
                   help="experts per token (default: 2, public plus one, as every expert was trained)")
    m.add_argument("--routing", choices=ROUTINGS, default="top_k",
                   help="the merged model's default routing (eval/generate --routing override it; default "
                        "%(default)s, the reference's)")
    m.add_argument("--routing_stats", nargs="+", default=None, metavar="NAME=FILE",
                   help="routing-stats files for domain routing, by merged expert name (public included); "
                        "default: each expert's routing_stats.npz beside it, the anchor's for public")
    m.add_argument("--drop_bias", action="store_true",
                   help="drop the experts' learned router biases, as the reference merge does (default: keep "
                        "them, so public + one expert computes exactly that owner's model)")
    m.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="rename the experts, one name per --expert in the same order (default: their own names)")
    m.add_argument("--public_router", default=None, metavar="CKPT|zeros",
                   help="where the public router row comes from when no input carries it (bare deliverables): "
                        "any owner's run directory or 2-expert model, a merged model, or 'zeros' "
                        "(default: from the inputs' run directories / full models)")
    m.set_defaults(fn=_cmd_merge)

    r = sub.add_parser("tune-router", help="optional router tuning of a merged model on public proxy data")
    r.add_argument("--ckpt", required=True, help="the merged model (flexmoe merge output) or any MoE checkpoint")
    r.add_argument("--out", required=True, help="run directory; the tuned model lands in OUT/model (resumable)")
    r.add_argument("--data_dir", default="flexmoe_data", help="FlexMix-mini data directory (public data only is read)")
    r.add_argument("--top_k", type=int, default=None, help="top-k while tuning and after (default: the checkpoint's)")
    r.add_argument("--per_expert", type=int, default=256,
                   help="public documents chosen per expert (default %(default)s)")
    r.add_argument("--public", type=int, default=512, help="extra random public documents (default %(default)s)")
    r.add_argument("--pool", type=int, default=4096,
                   help="public documents scored to choose from (default %(default)s)")
    r.add_argument("--include", nargs="+", default=None, metavar="NAME", help="keep only these experts")
    r.add_argument("--exclude", nargs="+", default=None, metavar="NAME", help="drop these experts")
    r.add_argument("--gin_file", action="append", default=[], help="extra gin files (repeatable)")
    r.add_argument("--gin_param", action="append", default=[], help="a gin binding K=V (repeatable)")
    r.set_defaults(fn=_cmd_tune_router)

    c = sub.add_parser("calibrate", help="public-data bias calibration of a merged model's router (no training)")
    c.add_argument("--ckpt", required=True, help="the merged model")
    c.add_argument("--out", required=True, help="output checkpoint (written atomically)")
    c.add_argument("--data_dir", default="flexmoe_data", help="FlexMix-mini data directory (public data only is read)")
    c.add_argument("--batches", type=int, default=8, help="public batches measured (default %(default)s)")
    c.add_argument("--batch_size", type=int, default=8)
    c.add_argument("--seq_len", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quantile", type=float, default=None,
                   help="calibrate a quantile of each expert's margin over public instead of its mean, e.g. 0.9: "
                        "an expert then outranks the public expert on at most ~10%% of public tokens")
    c.add_argument("--include", nargs="+", default=None, metavar="NAME", help="keep only these experts")
    c.add_argument("--exclude", nargs="+", default=None, metavar="NAME", help="drop these experts")
    c.add_argument("--report", default=None, help="write the margins before/after and the biases as JSON")
    c.set_defaults(fn=_cmd_calibrate)
