"""``flexmoe demo`` (the command): the replication, then the routing ablations when asked, or the core checks."""

from __future__ import annotations

from flexmoe_jax.demo.plan import DemoError
from flexmoe_jax.demo.replication import run
from flexmoe_jax.errors import UserError


def main(args) -> None:
    """Run ``args`` (``workdir``, ``quick``, ``parallel``, ``checks``, ``ablations``, ``anchor_sweep``);
    DemoError -> UserError."""
    if args.checks:
        from flexmoe_jax.demo import checks

        checks.run(args.workdir, quick=args.quick)
        return
    try:
        run(args.workdir, quick=args.quick, parallel=args.parallel, plan=getattr(args, "plan", None))
        parts = getattr(args, "ablations", None)
        if parts is not None:  # given with no value: every part
            from flexmoe_jax.demo import ablations

            ablations.main(args.workdir, quick=args.quick, parallel=args.parallel,
                           parts=tuple(parts) or ablations.PARTS)
        if getattr(args, "anchor_sweep", None):
            from flexmoe_jax.demo import anchor_strength

            anchor_strength.main(args.workdir, args.anchor_sweep, quick=args.quick, parallel=args.parallel)
    except DemoError as e:
        raise UserError(str(e)) from None
