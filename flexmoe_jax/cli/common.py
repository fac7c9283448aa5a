"""What several command groups share: the user-error type and the routing flags of eval and generate."""

from __future__ import annotations

from flexmoe_jax.errors import FlexmoeError


class CommandError(FlexmoeError):
    """An error the user can fix; printed as one line, exit status 2."""


def add_routing_flags(parser) -> None:
    """Adds ``--routing``, ``--routing_stats``, ``--router_score`` and ``--router_temperature`` to ``parser``."""
    from flexmoe_jax.config import ROUTINGS

    parser.add_argument("--routing", choices=(*ROUTINGS, "domain", "density"), default=None,
                        help="how tokens pick experts (default: domain for a merged model that carries every "
                             "active expert's routing stats, else the checkpoint's own, top_k unless merged with "
                             "--routing): top_k (the trained router rows), public_plus (public always + the top "
                             "k-1 others), document_* (router logits averaged over the document so far), domain "
                             "(each document's domain by the experts' token counts: public alone or {public, "
                             "domain}; see flexmoe_jax.routing), density (each token to the owner model, or the public "
                             "model, that best explains its document so far; nothing but the weights, one forward "
                             "pass per member)")
    parser.add_argument("--routing_stats", nargs="+", default=None, metavar="FILE",
                        help="for --routing domain: each expert's routing-stats file (flexmoe routing-stats); "
                             "default: the ones the merged checkpoint carries")
    parser.add_argument("--router_score", choices=("dot", "cosine"), default=None,
                        help="router scores: dot (the reference) or cosine (unit rows . unit residual / "
                             "--router_temperature); default: the checkpoint's")
    parser.add_argument("--router_temperature", type=float, default=None,
                        help="temperature of cosine router scores (default: the checkpoint's, 0.1)")


def routing_kwargs(args) -> dict:
    """The routing flags -> keyword arguments ``routing``, ``score``, ``routing_stats`` of eval/generate
    (see routing.resolve). Raises CommandError for --routing_stats with a routing other than domain."""
    from flexmoe_jax import routing

    if args.routing_stats and args.routing not in (None, "domain"):
        raise CommandError(f"--routing_stats is for --routing domain, not {args.routing}")
    score = {k: getattr(args, k) for k in ("router_score", "router_temperature") if getattr(args, k) is not None}
    return {"routing": args.routing, "score": score or None,
            "routing_stats": routing.load_stats(args.routing_stats) if args.routing_stats else None}
