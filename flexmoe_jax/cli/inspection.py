"""Looking at a model without changing it: ``compile-check`` (does a phase fit a TPU slice), ``verify``
(checksums of every array) and ``info`` (config and experts)."""

from __future__ import annotations

import sys


def _cmd_compile_check(args) -> int:
    from flexmoe_jax import compile_check

    return compile_check.main(args)


def _cmd_verify(args) -> int:
    from flexmoe_jax import verify

    status = verify.main(args.ckpt)
    for p in args.ckpt:
        _warn_disclosures(p)
    return status


def _warn_disclosures(path) -> None:
    """Print to stderr what a merged model gives away of its owners' data (loading.disclosures)."""
    from flexmoe_jax import loading
    from flexmoe_jax.checkpoint import CheckpointError

    try:
        lines = loading.disclosures(path)
    except (CheckpointError, OSError, ValueError, KeyError):
        return  # damaged or not a checkpoint: verify's own line says so
    for line in lines:
        print(f"WARNING: {path}: {line}", file=sys.stderr)


def _cmd_info(args) -> None:
    from flexmoe_jax import checkpoint

    config = checkpoint.load_config(args.ckpt)
    print(config.to_json())
    if config.is_moe:
        print(f"experts (slot order): {list(config.names)}; top_k={config.top_k}")
    print(f"parameters: {config.num_params():,}")
    if checkpoint.kind(args.ckpt) == checkpoint.MERGED_KIND:
        from flexmoe_jax import loading

        m = loading.read_manifest(args.ckpt)
        print(f"merged model: anchor {m['anchor'].get('path')} (fingerprint {m['anchor']['fingerprint'][:12]}), "
              f"bias {m['bias']}, public router {m['public_router']}")
        for e in m["experts"][1:]:
            man = e.get("manifest", {})
            extras = ", ".join(f"{k} {man[k]}" for k in ("task", "steps", "tokens", "license") if man.get(k))
            print(f"  slot {e['slot']} {e['name']}: {e['kind']} {e['source']}" + (f" ({extras})" if extras else ""))
            rel = (e.get("routing_stats") or {}).get("release")
            if rel and rel.get("mechanism") != "exact":
                print(f"    routing stats: ({rel['epsilon']:g}, {rel['delta']:g})-DP per {rel['unit']}, "
                      f"{rel['mechanism']}")
        _warn_disclosures(args.ckpt)


def add_parsers(sub) -> None:
    """Adds ``compile-check``, ``verify``, ``info`` to the ``flexmoe`` subparsers ``sub``."""
    cc = sub.add_parser("compile-check", help="compile a phase's training step (or a forward) for a TPU slice, here",
                        description="AOT-compiles the training step of the phase the gin files describe (pretrain, "
                                    "expert, dense, router_tune) with the trainer's shardings, or with --forward the "
                                    "model's forward pass, for a TPU topology described by libtpu (no TPU needed; "
                                    "pip install 'flexmoe_jax[tpu]'), and prints per-device memory against the chip's "
                                    "HBM, FLOPs and collective bytes per step. Exit 2 when it does not fit.")
    cc.add_argument("--gin_file", action="append", default=[], required=True,
                    help="gin files: a model (e.g. model/olmo2_7b.gin), a phase, a mesh preset (repeatable)")
    cc.add_argument("--gin_param", action="append", default=[], help="a gin binding K=V (repeatable)")
    cc.add_argument("--topology", required=True, help="the TPU slice, e.g. v5p-64, v5e-16, v6e-8")
    cc.add_argument("--forward", action="store_true", help="compile the model's forward (inference) instead")
    cc.add_argument("--json", metavar="FILE", help="also write every number of the report to FILE (JSON): memory by "
                                                   "kind, FLOPs, collective bytes")
    cc.set_defaults(fn=_cmd_compile_check)

    vf = sub.add_parser("verify", help="read back every array of checkpoints and say which are damaged",
                        description="Checks every array of any checkpoint kind (model, anchor, dense expert, "
                                    "deliverable, merged model, anchor kit, training run) against its crc32c, and "
                                    "against its sha256 manifest where it has one. One line per checkpoint; exit "
                                    "status 2 if any is damaged.")
    vf.add_argument("ckpt", nargs="+")
    vf.set_defaults(fn=_cmd_verify)

    n = sub.add_parser("info", help="print a checkpoint's config and experts")
    n.add_argument("ckpt")
    n.set_defaults(fn=_cmd_info)
