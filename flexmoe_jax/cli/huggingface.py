"""Hugging Face interchange: ``import-hf`` and ``export-hf`` (FlexOlmoForCausalLM / Olmo2ForCausalLM)."""

from __future__ import annotations


def _cmd_import_hf(args) -> None:
    from flexmoe_jax import checkpoint, hf

    config, params = hf.from_hf(args.src, dtype=args.dtype)
    checkpoint.save(args.out, config, params, metadata={"source": "hf", "hf_path": str(args.src)})
    kind = f"FlexOlmo MoE with experts {list(config.names)}, top-{config.top_k}" if config.is_moe else "dense OLMo-2"
    print(f"imported {kind} ({config.num_params():,} params) from {args.src} -> {args.out}")


def _cmd_export_hf(args) -> None:
    import os
    import sys

    from flexmoe_jax import hf, loading
    from flexmoe_jax.data import layout

    config, params = loading.load(args.ckpt)
    tok = args.tokenizer or (str(layout.tokenizer_path(args.data_dir)) if args.data_dir else None)
    if tok is not None and not os.path.isfile(tok):
        raise FileNotFoundError(f"no tokenizer at {tok}: pass --tokenizer SPM_MODEL or --data_dir with the anchor's "
                                "tokenizer/spm.model")
    hf.to_hf(config, params, args.out, max_shard_size=args.max_shard_size, tokenizer=tok)
    print(f"exported {args.ckpt} -> {args.out} ({'FlexOlmoForCausalLM' if config.is_moe else 'Olmo2ForCausalLM'}"
          f"{', tokenizer ' + tok if tok else ''}; generation_config.json)")
    if tok is None:
        print("note: no tokenizer written; pass --data_dir DIR (or --tokenizer spm.model) so "
              "AutoTokenizer.from_pretrained works on the export", file=sys.stderr)


def add_parsers(sub) -> None:
    """Adds ``import-hf``, ``export-hf`` to the ``flexmoe`` subparsers ``sub``."""
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
    e.add_argument("--data_dir", default=None,
                   help="data directory whose tokenizer/spm.model the model was trained with: written as an HF "
                        "tokenizer (tokenizer.model + tokenizer_config.json)")
    e.add_argument("--tokenizer", default=None, metavar="SPM_MODEL",
                   help="the SentencePiece model to write as the HF tokenizer (instead of --data_dir's)")
    e.set_defaults(fn=_cmd_export_hf)
