"""Measuring models: ``eval`` (per-domain perplexity, bits per byte, multiple choice) and ``privacy``
(training-data extraction)."""

from __future__ import annotations

import sys

from flexmoe_jax.cli.common import CommandError, add_routing_flags, routing_kwargs


def _cmd_eval(args) -> None:
    from flexmoe_jax import eval as eval_lib

    chosen = [f for f in ("include", "exclude", "top_k") if getattr(args, f) is not None]
    if chosen and len(args.ckpt) > 1:
        raise CommandError(f"--{chosen[0]} would apply to all {len(args.ckpt)} --ckpt of this call; evaluate each "
                           "selection in its own call with the same --json (results accumulate there), e.g. "
                           f"`flexmoe eval --ckpt M --name full --json R` then `flexmoe eval --ckpt M --name "
                           f"minus_x --exclude x --json R`")

    eval_lib.main_eval(args.ckpt, args.data_dir, names=args.name, include=args.include, exclude=args.exclude,
                       top_k=args.top_k, tasks=args.tasks, split=args.split, seq_len=args.seq_len,
                       batch_size=args.batch_size, mc_items_per_domain=args.mc_items, json_out=args.json,
                       table_out=args.table, plot_out=args.plot, max_tokens=args.max_tokens,
                       sample_seed=args.sample_seed, max_doc_tokens=args.max_doc_tokens, **routing_kwargs(args))


def _cmd_privacy(args) -> None:
    from flexmoe_jax import privacy, selection

    selection.check_one_of(args.include, args.exclude)
    if args.name is not None and len(args.name) != len(args.ckpt):
        raise CommandError(f"{len(args.name)} --name for {len(args.ckpt)} --ckpt: give one name per checkpoint")
    if args.name is not None and len(set(args.name)) != len(args.name):
        raise CommandError(f"--name values must differ, got {args.name}")
    if args.docs < 1:
        raise CommandError(f"--docs must be at least 1, got {args.docs}")
    trained_from = None
    if args.trained_from:
        bad = [x for x in args.trained_from if "=" not in x or not x.split("=", 1)[0] or not x.split("=", 1)[1]]
        if bad:
            raise CommandError(f"--trained_from takes DOMAIN=RUN_DIR items, got {bad}")
        trained_from = dict(x.split("=", 1) for x in args.trained_from)
    models = dict(zip(args.name, args.ckpt)) if args.name else args.ckpt
    results = privacy.run(models, args.data_dir, args.tasks, num_docs=args.docs, splits=args.splits,
                          trained_from=trained_from,
                          prefix_len=args.prefix_len, suffix_len=args.suffix_len, samples=args.samples,
                          threshold=args.threshold, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, batch_size=args.batch_size, include=args.include, exclude=args.exclude)
    print(privacy.markdown(results))
    if args.json:
        privacy.write_json(args.json, results)
        print(f"wrote {args.json}", file=sys.stderr)


def _cmd_privacy_audit(args) -> int:
    from flexmoe_jax import storage
    from flexmoe_jax.privacy import audit

    report = audit.audit(args.deliverable, args.data, expert=args.expert, anchor=args.anchor, task=args.task,
                         reference_stats=args.reference_stats, canary_file=args.canaries, seed=args.seed,
                         extraction=not args.no_extraction, stats_file=args.stats, weights=not args.no_weights)
    print(audit.markdown(report))
    if args.json:
        storage.write_json(args.json, report)
    return 0 if report["verdict"]["pass"] else 1


def add_parsers(sub) -> None:
    """Adds ``eval``, ``privacy`` to the ``flexmoe`` subparsers ``sub``."""
    v = sub.add_parser("eval", help="per-domain perplexity / bits per byte and multiple choice; JSON + table")
    v.add_argument("--ckpt", required=True, nargs="+", help="checkpoint(s): model, merged model or run directory")
    v.add_argument("--name", nargs="+", default=None, help="a result name per checkpoint (default: from the path)")
    v.add_argument("--data_dir", default="flexmoe_data", help="FlexMix-mini data directory")
    v.add_argument("--tasks", nargs="+", default=None,
                   help="domains or task names (default: every closed domain, every owner task registered in "
                        "--data_dir, and public)")
    v.add_argument("--split", default="test", help="held-out split (default %(default)s)")
    v.add_argument("--include", nargs="+", default=None, metavar="NAME", help="keep only these experts")
    v.add_argument("--exclude", nargs="+", default=None, metavar="NAME", help="drop these experts (opt-out)")
    v.add_argument("--top_k", type=int, default=None, help="override top-k")
    v.add_argument("--seq_len", type=int, default=None, help="scoring window (default: 128, capped at max_seq_len)")
    v.add_argument("--batch_size", type=int, default=16)
    v.add_argument("--mc_items", type=int, default=100, help="multiple-choice items per domain (default %(default)s)")
    v.add_argument("--max_tokens", type=int, default=None,
                   help="score a seeded sample of whole documents of about this many tokens per domain, drawn "
                        "across the split (across a mixture's sources in proportion); default: the whole split")
    v.add_argument("--sample_seed", type=int, default=0, help="seed of that document sample (default %(default)s)")
    v.add_argument("--max_doc_tokens", type=int, default=None,
                   help="score a document longer than this on one seeded window of whole lines of about this many "
                        "tokens (every document stays in the sample); default: every token")
    add_routing_flags(v)
    v.add_argument("--json", default=None, help="write/update results JSON here")
    v.add_argument("--table", default=None, help="write the markdown table here")
    v.add_argument("--plot", default=None, help="write a PNG of per-domain bits per byte here")
    v.set_defaults(fn=_cmd_eval)

    pv = sub.add_parser("privacy", help="training-data extraction check (FlexOlmo's privacy test); table + JSON",
                        description="For documents of each domain, sample --samples continuations of the first "
                                    "--prefix_len tokens; a document is extracted if any sample's next "
                                    "--suffix_len tokens have normalized Levenshtein similarity (on token ids) "
                                    ">= --threshold with the true ones. Training documents are compared with "
                                    "held-out ones: memorization shows as a train rate far above the test rate.")
    pv.add_argument("--ckpt", required=True, nargs="+", help="checkpoint(s): model, merged model or run directory")
    pv.add_argument("--name", nargs="+", default=None, help="a result name per checkpoint (default: from the path)")
    pv.add_argument("--data_dir", default="flexmoe_data", help="FlexMix-mini data directory")
    pv.add_argument("--tasks", nargs="+", default=None, help="domains or task names (default: every closed domain)")
    pv.add_argument("--splits", nargs="+", default=["train", "test"],
                    help="splits to check; the first is the trained-on one (default: %(default)s)")
    pv.add_argument("--docs", type=int, default=100, help="documents per domain and split (default %(default)s)")
    pv.add_argument("--trained_from", nargs="+", default=None, metavar="DOMAIN=RUN_DIR",
                    help="check pieces (seq_len-token cuts) of each domain's train documents that this "
                         "training run (its directory, with state/) was actually fed, replayed from its saved data "
                         "position, against pieces of held-out documents cut the same way; default: the first "
                         "train documents in storage order, not known to be trained on")
    pv.add_argument("--samples", type=int, default=10, help="sampled continuations per document (default %(default)s)")
    pv.add_argument("--prefix_len", type=int, default=32, help="prompt tokens per document (default %(default)s)")
    pv.add_argument("--suffix_len", type=int, default=32, help="continuation tokens compared (default %(default)s)")
    pv.add_argument("--threshold", type=float, default=0.9,
                    help="similarity that counts as extracted (default %(default)s)")
    pv.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default %(default)s)")
    pv.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--batch_size", type=int, default=64, help="rows (document x sample) per generation call")
    pv.add_argument("--include", nargs="+", default=None, metavar="NAME", help="keep only these experts")
    pv.add_argument("--exclude", nargs="+", default=None, metavar="NAME", help="drop these experts (opt-out)")
    pv.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    pv.set_defaults(fn=_cmd_privacy)

    au = sub.add_parser("privacy-audit", help="attack everything an owner publishes (also `flexmoe privacy audit`)",
                        description="Runs membership (strings, documents), reconstruction, canary and extraction "
                                    "attacks on each artifact of DELIVERABLE: its routing stats, its weights (the "
                                    "owner's model against the public model) and its manifests, trained-on text "
                                    "against held-out text of the owner's data (docs/privacy.md, 'The audit'). "
                                    "Prints a table; exit status 1 when an artifact fails the targets.")
    au.add_argument("deliverable",
                    help="an owner's run directory (train-expert --out), a merged model or a routing-stats .npz")
    au.add_argument("--data", required=True, help="the owner's data directory (train and test splits)")
    au.add_argument("--expert", default=None, help="the owner to audit in a merged model")
    au.add_argument("--task", default=None, help="the owner's task (default: the one its manifest records)")
    au.add_argument("--anchor", default=None, help="the public model (default: the one the deliverable records)")
    au.add_argument("--reference_stats", default=None, metavar="FILE",
                    help="the attacker's public-data routing stats (likelihood-ratio reference; default: the "
                         "merged model's public stats, else none)")
    au.add_argument("--stats", default=None, metavar="FILE", help="audit this routing-stats file instead")
    au.add_argument("--canaries", default=None, metavar="FILE", help="canaries planted in the owner's data (JSON)")
    au.add_argument("--no_weights", action="store_true", help="attack only the statistics and manifests")
    au.add_argument("--no_extraction", action="store_true", help="skip the extraction check")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON here")
    au.set_defaults(fn=_cmd_privacy_audit)
