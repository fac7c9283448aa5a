"""The data card: documents, bytes and tokens per config and split, with sources, licenses,
package versions and what the hygiene steps removed. Written as ``card.json`` and ``card.md``."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from flexmoe_jax.data import layout as L, sources as S, splits, tokenizer as T
from flexmoe_jax.storage import write_json


def compute(data_dir, configs, manifest: dict) -> dict:
    """Measure every split of the given FlexMix-mini configs (reads the tfds datasets)."""
    from flexmoe_jax.data.tfds_io import read_split_texts

    sp = T.processor(L.tokenizer_path(data_dir))
    out = {"name": "FlexMix-mini", "data_dir": str(Path(data_dir).resolve()),
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "tokenizer": {**manifest.get("tokenizer", {}), "vocab_size": sp.get_piece_size(),
                         "path": str(L.tokenizer_path(data_dir))},
           "splits": {"rule": "sha256(normalized text) -> train 90% / validation 5% / test 5%"},
           "configs": {}}
    for c in configs:
        src = S.SOURCES[c]
        entry = manifest["configs"][c]
        rows = {}
        for s in splits.SPLITS:
            texts = read_split_texts(data_dir, L.FLEXMIX_NAME, c, s)
            nbytes = sum(len(t.encode("utf-8")) for t in texts)
            ntok = sum(T.count_tokens(sp, texts))
            rows[s] = {"docs": len(texts), "bytes": nbytes, "tokens": ntok,
                       "bytes_per_token": round(nbytes / ntok, 4) if ntok else None}
        out["configs"][c] = {
            "task": f"{L.TASK_PREFIX}{c}", "tfds": L.tfds_name(L.FLEXMIX_NAME, c),
            "kind": "public" if src.is_public else "closed", "description": src.description,
            "license": src.license, "url": src.url, "packages": entry["args"]["packages"],
            "caps": {"max_docs": entry["args"]["max_docs"], "max_bytes": entry["args"]["max_bytes"],
                     **({"max_train_bytes": entry["args"]["train_bytes"]} if "train_bytes" in entry["args"] else {})},
            "removed": {k: v for k, v in entry.get("selection", {}).items() if k != "candidates"},
            "candidates": entry.get("selection", {}).get("candidates"),
            "splits": rows,
        }
    return out


def write(data_dir, card: dict) -> None:
    """Write ``card.json`` and ``card.md`` atomically."""
    write_json(Path(data_dir) / "card.json", card, sort_keys=False)  # keep the domain order
    md = Path(data_dir) / "card.md"
    tmp = md.with_name("card.md.tmp")
    tmp.write_text(markdown(card))
    tmp.replace(md)


def load(data_dir) -> dict:
    p = Path(data_dir) / "card.json"
    if not p.exists():
        raise FileNotFoundError(f"no data card in {data_dir}: run `flexmoe data build --data_dir {data_dir}`")
    return json.loads(p.read_text())


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def markdown(card: dict) -> str:
    lines = ["# FlexMix-mini data card", "",
             f"Tokenizer: SentencePiece BPE, {card['tokenizer']['vocab_size']} pieces, byte fallback, trained on "
             "the public train split only. Splits: sha256 of the normalized text -> train 90 % / "
             "validation 5 % / test 5 % (at least one document each); exact duplicates removed; the "
             "public sources exclude every document sharing a 13-word sequence with the closed corpora.", "",
             "| config | kind | split | docs | MB | tokens | bytes/token |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    tot: dict[str, dict[str, int]] = {}
    for c, e in card["configs"].items():
        for s, r in e["splits"].items():
            lines.append(f"| {c} | {e['kind']} | {s} | {r['docs']:,} | {_mb(r['bytes'])} | {r['tokens']:,} | "
                         f"{r['bytes_per_token'] if r['bytes_per_token'] is not None else '-'} |")
            t = tot.setdefault(e["kind"], {"docs": 0, "bytes": 0, "tokens": 0})
            for k in t:
                t[k] += r[k]
    for kind, t in tot.items():
        bpt = round(t["bytes"] / t["tokens"], 4) if t["tokens"] else "-"
        lines.append(f"| **all {kind}** | {kind} | all | {t['docs']:,} | {_mb(t['bytes'])} | {t['tokens']:,} | {bpt} |")
    lines += ["", "| config | source | license | packages | candidates | duplicates | contaminated | empty |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for c, e in card["configs"].items():
        pk = ", ".join(f"{k} {v}" for k, v in e["packages"].items())
        rm = e.get("removed", {})
        lines.append(f"| {c} | {e['description']} | {e['license']} | {pk} | {e.get('candidates') or 0:,} | "
                     f"{rm.get('duplicates', 0):,} | {rm.get('contaminated', 0):,} | {rm.get('empty', 0):,} |")
    lines += ["", "`candidates`: documents the source offered; `duplicates`: exact duplicates removed; "
              "`contaminated`: public documents skipped for sharing a 13-gram with a closed corpus while "
              "filling the caps; tokens include one EOS per document.", ""]
    return "\n".join(lines)
