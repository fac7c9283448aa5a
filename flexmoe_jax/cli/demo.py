"""``flexmoe demo``: the FlexOlmo mini-replication end to end, or the one-minute core checks."""

from __future__ import annotations

from flexmoe_jax.cli.common import CommandError


def _cmd_demo(args) -> None:
    from flexmoe_jax import demo

    if args.parallel < 1:
        raise CommandError(f"--parallel must be at least 1, got {args.parallel}")
    demo.main(args)


def add_parsers(sub) -> None:
    """Adds ``demo`` to the ``flexmoe`` subparsers ``sub``."""
    d = sub.add_parser("demo", help="the FlexOlmo mini-replication end to end: data, public model, experts in "
                                    "their own processes, merge, baselines, evaluation, report",
                       description="Builds FlexMix-mini, pretrains the public model, trains each owner's expert in "
                                   "its own process on only its own data, merges them, trains and evaluates every "
                                   "baseline, and writes WORKDIR/results/ (results.md, results.json, plots). "
                                   "Resumable: rerun the same command to continue.")
    d.add_argument("--quick", action="store_true", help="tiny sizes; a few minutes (what the tests run)")
    d.add_argument("--workdir", default="flexmoe_demo",
                   help="where data, checkpoints and results go (default: %(default)s)")
    d.add_argument("--parallel", type=int, default=2,
                   help="owners' expert trainings run at once (default: %(default)s)")
    d.add_argument("--ablations", action="store_true",
                   help="then the routing ablations (flexmoe_jax.demo.ablations): router inits, bias, routing modes, "
                        "each measured as the demo is; WORKDIR/results/ablations.{md,json,png}")
    d.add_argument("--checks", action="store_true",
                   help="instead: a one-minute check of the core (dispatch paths, opt-out, checkpoint and HF round "
                        "trips) on a random model, no data needed")
    d.set_defaults(fn=_cmd_demo)
