"""``flexmoe demo`` (the command): the replication, then the routing ablations when asked, or the core checks."""

from __future__ import annotations

from flexmoe_jax.demo.plan import DemoError
from flexmoe_jax.demo.replication import run
from flexmoe_jax.errors import UserError


def main(args) -> None:
    """Run ``args`` (``workdir``, ``quick``, ``parallel``, ``checks``, ``ablations``); DemoError -> UserError."""
    if args.checks:
        from flexmoe_jax.demo import checks

        checks.run(args.workdir, quick=args.quick)
        return
    try:
        run(args.workdir, quick=args.quick, parallel=args.parallel)
        if getattr(args, "ablations", False):
            from flexmoe_jax.demo import ablations

            ablations.main(args.workdir, quick=args.quick, parallel=args.parallel)
    except DemoError as e:
        raise UserError(str(e)) from None
