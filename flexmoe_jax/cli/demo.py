"""``flexmoe demo``: the FlexOlmo mini-replication end to end, or the one-minute core checks."""

from __future__ import annotations

from flexmoe_jax.cli.common import CommandError


def _cmd_demo(args) -> None:
    from flexmoe_jax import demo

    if args.parallel < 1:
        raise CommandError(f"--parallel must be at least 1, got {args.parallel}")
    if args.anchor_sweep and min(args.anchor_sweep) < 1:
        raise CommandError(f"--anchor_sweep takes positive step counts, got {args.anchor_sweep}")
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
    d.add_argument("--plan", choices=("full", "inverted"), default=None,
                   help="the full run's sizes: full (default; proportioned like the paper: docs/demo.md) or "
                        "inverted (the earlier plan, whose weak anchor and large vocabulary invert the paper's "
                        "regime; kept for comparison)")
    d.add_argument("--workdir", default="flexmoe_demo",
                   help="where data, checkpoints and results go (default: %(default)s)")
    d.add_argument("--parallel", type=int, default=2,
                   help="owners' expert trainings run at once (default: %(default)s)")
    d.add_argument("--ablations", nargs="*", choices=("routing", "knobs"), default=None,
                   help="then the ablations (flexmoe_jax.demo.ablations), each measured as the demo is: "
                        "'routing' (router inits and biases, each a new set of owners' experts, x routing modes), "
                        "'knobs' (the demo's experts merged without biases; its merged model at top-1/3, "
                        "bias-calibrated on public text, router-tuned on public proxy data); no value: both; "
                        "WORKDIR/results/ablations.{md,json,png}")
    d.add_argument("--anchor_sweep", type=int, nargs="+", default=None, metavar="STEPS",
                   help="then, for public models pretrained this many steps, train every owner's expert and dense "
                        "expert again and measure how far FlexOlmo's experts get towards dense ones "
                        "(flexmoe_jax.demo.anchor_strength); WORKDIR/results/anchor_strength.{md,json}")
    d.add_argument("--checks", action="store_true",
                   help="instead: a one-minute check of the core (dispatch paths, opt-out, checkpoint and HF round "
                        "trips) on a random model, no data needed")
    d.set_defaults(fn=_cmd_demo)
