"""The ``flexmoe`` command line.

Every command prints a one-line error and exits non-zero on bad input; heavy
imports happen inside the command so ``flexmoe --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flexmoe_jax import storage
from flexmoe_jax.errors import FlexmoeError


class CommandError(FlexmoeError):
    """An error the user can fix; printed as one line, exit status 2."""


def _cmd_import_hf(args) -> None:
    from flexmoe_jax import checkpoint, hf

    config, params = hf.from_hf(args.src, dtype=args.dtype)
    checkpoint.save(args.out, config, params, metadata={"source": "hf", "hf_path": str(args.src)})
    kind = f"FlexOlmo MoE with experts {list(config.names)}, top-{config.top_k}" if config.is_moe else "dense OLMo-2"
    print(f"imported {kind} ({config.num_params():,} params) from {args.src} -> {args.out}")


def _cmd_export_hf(args) -> None:
    from flexmoe_jax import hf, loading

    config, params = loading.load(args.ckpt)
    hf.to_hf(config, params, args.out, max_shard_size=args.max_shard_size)
    print(f"exported {args.ckpt} -> {args.out} ({'FlexOlmoForCausalLM' if config.is_moe else 'Olmo2ForCausalLM'})")


def _cmd_compile_check(args) -> int:
    from flexmoe_jax import compile_check

    return compile_check.main(args)


def _cmd_verify(args) -> int:
    from flexmoe_jax import verify

    return verify.main(args.ckpt)


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


def _cmd_merge(args) -> None:
    from flexmoe_jax import checkpoint, loading, merge, storage

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


def _format_attribution(a: dict) -> str:
    if a["dense"]:
        return f"dense model (no experts); {a['tokens']} tokens"
    shares = ", ".join(f"{name} {share:.1%} ({a['counts'][name]} picks)"
                       for name, share in sorted(a["experts"].items(), key=lambda kv: -kv[1]))
    out = f"{shares}; {a['tokens']} tokens x {a['layers']} layers, top-{a['top_k']}"
    return out + (f"; opted out: {', '.join(a['excluded'])}" if a["excluded"] else "")


def _cmd_generate(args) -> None:
    from flexmoe_jax import checkpoint, data, generate, loading

    if any(not p.strip() for p in args.prompt):
        raise CommandError("--prompt is empty: give some text to continue")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.include is not None and args.exclude is not None:
        raise CommandError("give --include or --exclude, not both")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise CommandError(f"cannot write --json {args.json}: directory {parent} does not exist")
    full = checkpoint.load_config(args.ckpt)
    if full.max_seq_len < args.max_new_tokens + 1:
        raise CommandError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt: the model's "
                           f"max_seq_len is {full.max_seq_len}")
    # The plain SentencePiece processor, not the seqio wrapper: same ids, and no TensorFlow import.
    vocab = data.sentencepiece(args.data_dir)
    if vocab.get_piece_size() > full.vocab_size:
        raise CommandError(f"the tokenizer in {args.data_dir} has {vocab.get_piece_size()} pieces but the model's "
                           f"vocab is {full.vocab_size}: use the data directory the model was trained with")

    # loading.load reads only the kept experts of a merged checkpoint (excluded ones are never opened).
    # --include/--exclude take expert names, as in every command (slot numbers are for the Python API).
    config, params = loading.load(args.ckpt, include=args.include, exclude=args.exclude, top_k=args.top_k)
    excluded = [n for n in full.names if n not in config.names] if full.is_moe else []
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top_p {args.top_p}"
    print(f"generating up to {args.max_new_tokens} tokens for {len(args.prompt)} prompt(s) (compiling first; {how})",
          file=sys.stderr)
    kw = _routing(args)
    if kw["routing_stats"] is None:
        from flexmoe_jax import eval as eval_lib

        kw["routing"], kw["routing_stats"] = eval_lib.default_routing(args.ckpt, config, kw["routing"])
    results = generate.generate_text(config, params, args.prompt, vocab, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, **kw)
    for i, r in enumerate(results):
        if config.is_moe:
            r["attribution"]["excluded"] = excluded
        print(f"=== [{i}] {r['prompt']}")
        print(r["completion"])
        print(f"--- experts: {_format_attribution(r['attribution'])}")
    if args.json:
        storage.write_json(args.json, results, sort_keys=False)
        print(f"wrote {args.json}", file=sys.stderr)


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


def _cmd_eval(args) -> None:
    from flexmoe_jax import eval as eval_lib

    eval_lib.main_eval(args.ckpt, args.data_dir, names=args.name, include=args.include, exclude=args.exclude,
                       top_k=args.top_k, tasks=args.tasks, split=args.split, seq_len=args.seq_len,
                       batch_size=args.batch_size, mc_items_per_domain=args.mc_items, json_out=args.json,
                       table_out=args.table, plot_out=args.plot, max_tokens=args.max_tokens,
                       sample_seed=args.sample_seed, **_routing(args))


def _routing(args) -> dict:
    """``--routing``/``--routing_stats`` -> keyword arguments of eval/generate (see routing.resolve)."""
    from flexmoe_jax import routing

    if args.routing_stats and args.routing not in (None, "domain"):
        raise CommandError(f"--routing_stats is for --routing domain, not {args.routing}")
    score = {k: getattr(args, k) for k in ("router_score", "router_temperature") if getattr(args, k) is not None}
    return {"routing": args.routing, "score": score or None,
            "routing_stats": routing.load_stats(args.routing_stats) if args.routing_stats else None}


def _add_routing_flags(parser) -> None:
    from flexmoe_jax.config import ROUTINGS

    parser.add_argument("--routing", choices=(*ROUTINGS, "domain"), default=None,
                        help="how tokens pick experts (default: domain for a merged model that carries every "
                             "active expert's routing stats, else the checkpoint's own, top_k unless merged with "
                             "--routing): top_k (the trained router rows), public_plus (public always + the top "
                             "k-1 others), document_* (router logits averaged over the document so far), domain "
                             "(each document's domain by the experts' token counts: public alone or {public, "
                             "domain}; see flexmoe_jax.routing)")
    parser.add_argument("--routing_stats", nargs="+", default=None, metavar="FILE",
                        help="for --routing domain: each expert's routing-stats file (flexmoe routing-stats); "
                             "default: the ones the merged checkpoint carries")
    parser.add_argument("--router_score", choices=("dot", "cosine"), default=None,
                        help="router scores: dot (the reference) or cosine (unit rows . unit residual / "
                             "--router_temperature); default: the checkpoint's")
    parser.add_argument("--router_temperature", type=float, default=None,
                        help="temperature of cosine router scores (default: the checkpoint's, 0.1)")


def _cmd_anchor_kit(args) -> None:
    from flexmoe_jax import anchor_kit

    out = anchor_kit.build(args.anchor, args.data_dir, args.out, method=args.router_init,
                           public_task=args.public_task, seq_len=args.seq_len, num_docs=args.docs,
                           num_batches=args.batches, seed=args.seed)
    kit = anchor_kit.open_kit(out)
    print(f"anchor kit {kit.kit_id[:16]}... (router init {kit.method}) -> {out}; owners train with "
          f"`flexmoe train-expert --anchor {out}`, the builder merges with `flexmoe merge --anchor {out}`")


def _cmd_routing_stats(args) -> None:
    from flexmoe_jax import routing

    name = args.name or args.task.split(".")[-1]
    stats = routing.fit(args.data_dir, args.task, name, split=args.split, max_tokens=args.max_tokens)
    path = stats.save(args.out)
    print(f"{name}: {stats.tokens:,} tokens of {stats.source['documents']:,} {args.task} {args.split} "
          f"documents counted -> {path}")


def _cmd_privacy(args) -> None:
    from flexmoe_jax import privacy

    if args.include is not None and args.exclude is not None:
        raise CommandError("give --include or --exclude, not both")
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


def _train_from_gin(files, bindings, workdir, platform: str | None = None, allow_cpu: bool = False) -> tuple:
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
    _platform_args(x)
    x.set_defaults(fn=fn)


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
    _write_routing_stats(rc, name, result["config"].vocab_size, args.out)


def _cmd_train_dense(args) -> None:
    _train_owner(args, "dense")


def _write_routing_stats(rc, name: str, vocab_size: int, out) -> None:
    """The owner's token counts for domain routing, OUT/routing_stats.npz, counted in the owner's own
    process from its own data (aggregate counts, no text; see flexmoe_jax.routing)."""
    import jax

    from flexmoe_jax import routing

    path = Path(out) / routing.STATS_FILE
    if jax.process_index() != 0 or path.exists():
        return
    stats = routing.fit(rc.data_dir, rc.task, name, seq_len=rc.seq_len, vocab_size=vocab_size)
    stats.save(path)
    print(f"routing stats: {stats.tokens:,} tokens of {stats.source['documents']:,} {rc.task} train documents "
          f"-> {path}")


def _cmd_demo(args) -> None:
    from flexmoe_jax import demo

    if args.parallel < 1:
        raise CommandError(f"--parallel must be at least 1, got {args.parallel}")
    demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    from flexmoe_jax.config import ROUTINGS

    p = argparse.ArgumentParser(
        prog="flexmoe",
        description="FlexOlmo-style mixture-of-experts in JAX: independently trained experts, "
                    "merged, switchable at inference.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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
                   help="then the routing ablations (flexmoe_jax.ablations): router inits, bias, routing modes, "
                        "each measured as the demo is; WORKDIR/results/ablations.{md,json,png}")
    d.add_argument("--checks", action="store_true",
                   help="instead: a one-minute check of the core (dispatch paths, opt-out, checkpoint and HF round "
                        "trips) on a random model, no data needed")
    d.set_defaults(fn=_cmd_demo)

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

    rs = sub.add_parser("routing-stats", help="count the tokens of an expert's data for domain routing",
                        description="Writes OUT (.npz): token counts of TASK's split in DATA_DIR, named NAME. "
                                    "An owner runs it on its own data (aggregate counts leave, no text); the "
                                    "model builder runs it on the public data for the public expert.")
    rs.add_argument("--data_dir", required=True, help="the data directory holding the task")
    rs.add_argument("--task", required=True, help="the task, e.g. flexmix_mini.math or flexmix_mini.public")
    rs.add_argument("--name", default=None, help="the expert's name (default: the task's last component)")
    rs.add_argument("--split", default="train", help="split to count (default %(default)s)")
    rs.add_argument("--max_tokens", type=int, default=None, help="count a seeded sample of about this many tokens")
    rs.add_argument("--out", required=True, help="the .npz file to write")
    rs.set_defaults(fn=_cmd_routing_stats)

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

    v = sub.add_parser("eval", help="per-domain perplexity / bits per byte and multiple choice; JSON + table")
    v.add_argument("--ckpt", required=True, nargs="+", help="checkpoint(s): model, merged model or run directory")
    v.add_argument("--name", nargs="+", default=None, help="a result name per checkpoint (default: from the path)")
    v.add_argument("--data_dir", default="flexmoe_data", help="FlexMix-mini data directory")
    v.add_argument("--tasks", nargs="+", default=None,
                   help="domains or task names (default: every closed domain + public)")
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
    _add_routing_flags(v)
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

    g = sub.add_parser("generate", help="text generation with per-expert attribution",
                       description="Continue each --prompt with the model (KV-cache decoding, one compiled "
                                   "loop) and print, per prompt, the completion and each active expert's share "
                                   "of the routing weight over the generated tokens. Excluded experts are never "
                                   "read from disk for a merged model.")
    g.add_argument("--ckpt", required=True, help="model checkpoint: merged FlexOlmo, expert model, or dense anchor")
    g.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="text to continue (repeatable: prompts run as one batch)")
    g.add_argument("--data_dir", default="flexmoe_data",
                   help="data directory holding the anchor's tokenizer (tokenizer/spm.model; default: %(default)s)")
    g.add_argument("--max_new_tokens", type=int, default=64,
                   help="most tokens to generate per prompt (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy decoding (default: %(default)s)")
    g.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: sample only from the most likely tokens holding this much probability "
                        "(default: %(default)s = all)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    g.add_argument("--exclude", action="extend", nargs="+", default=None, metavar="NAME",
                   help="opt these experts out (names or slot indices; repeatable)")
    g.add_argument("--include", action="extend", nargs="+", default=None, metavar="NAME",
                   help="opt in only these experts (names or slot indices; repeatable); not with --exclude")
    g.add_argument("--top_k", type=int, default=None,
                   help="experts per token (default: the checkpoint's, capped at the number active)")
    _add_routing_flags(g)
    g.add_argument("--json", default=None, metavar="OUT",
                   help="also write a JSON list of {prompt, completion, tokens, attribution} to OUT")
    g.set_defaults(fn=_cmd_generate)

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

    from flexmoe_jax.data_cli import add_data_commands

    add_data_commands(sub)
    return p


def _close_progress_bars() -> None:
    """End any progress bar a failed command left open, so its error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    from flexmoe_jax import tf_quiet

    tf_quiet.install()  # TensorFlow (the data pipeline's engine) prints C++ lines on import
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "data_dir", None) and args.command != "data" and storage.is_remote(args.data_dir):
            from flexmoe_jax.data import staging

            args.data_dir = staging.stage(args.data_dir, log=lambda m: print(m, file=sys.stderr))
        status = args.fn(args)
    except (FlexmoeError, OSError) as e:  # bad input, or a missing / unwritable file: one line, status 2
        _close_progress_bars()
        print(f"flexmoe {args.command}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0  # anything else is a bug: its traceback shows


if __name__ == "__main__":
    sys.exit(main())
