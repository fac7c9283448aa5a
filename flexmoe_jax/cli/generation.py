"""``flexmoe generate``: text generation with each active expert's share of the routing weight."""

from __future__ import annotations

import os
import sys

from flexmoe_jax import storage
from flexmoe_jax.cli.common import CommandError, add_routing_flags, routing_kwargs


def _format_attribution(a: dict) -> str:
    """One line of expert shares from generate_text's ``attribution`` dict."""
    if a["dense"]:
        return f"dense model (no experts); {a['tokens']} tokens"
    shares = ", ".join(f"{name} {share:.1%} ({a['counts'][name]} picks)"
                       for name, share in sorted(a["experts"].items(), key=lambda kv: -kv[1]))
    out = f"{shares}; {a['tokens']} tokens x {a['layers']} layers, top-{a['top_k']}"
    return out + (f"; opted out: {', '.join(a['excluded'])}" if a["excluded"] else "")


def _check_flags(args) -> None:
    """Raises CommandError (UserError for the expert selection) for flags that cannot work whatever the checkpoint."""
    from flexmoe_jax import selection

    if any(not p.strip() for p in args.prompt):
        raise CommandError("--prompt is empty: give some text to continue")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    selection.check_one_of(args.include, args.exclude)
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise CommandError(f"cannot write --json {args.json}: directory {parent} does not exist")


def _cmd_generate(args) -> None:
    from flexmoe_jax import checkpoint, data, generate, loading

    _check_flags(args)
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
    kw = routing_kwargs(args)
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


def add_parsers(sub) -> None:
    """Adds ``generate`` to the ``flexmoe`` subparsers ``sub``."""
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
    add_routing_flags(g)
    g.add_argument("--json", default=None, metavar="OUT",
                   help="also write a JSON list of {prompt, completion, tokens, attribution} to OUT")
    g.set_defaults(fn=_cmd_generate)
