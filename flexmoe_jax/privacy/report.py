"""The privacy check's results as a markdown table and as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from flexmoe_jax import storage


def _docs_cell(r: dict) -> str:
    sel = r.get("selection")
    if not sel:
        return str(r["docs"])
    kind = {True: "trained-on", False: "held-out", None: "not known trained on"}[sel.get("trained_on")]
    if sel.get("available") is None:
        return f"{sel['used']} ({kind})"
    unit = " pieces" if sel.get("unit") == "piece" else ""
    return f"{sel['used']} of {sel['available']} {kind}{unit}"


def markdown(results: Mapping[str, Mapping[str, Mapping[str, dict]]]) -> str:
    """One row per (model, domain): per split, the documents used (of how many available, and
    whether trained on), extracted / checked, the rate and the mean best similarity; then a line
    per (domain, split) saying where its documents came from."""
    splits = list(dict.fromkeys(s for by_dom in results.values() for by_split in by_dom.values() for s in by_split))
    head = ["model", "domain"]
    for s in splits:
        head += [f"{s} docs", f"{s} extracted", f"{s} rate", f"{s} mean best sim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sources: dict[tuple[str, str, str], list[str]] = {}  # (domain, split, source) -> models
    for name, by_dom in results.items():
        for dom, by_split in by_dom.items():
            cells = [name, dom]
            for s in splits:
                r = by_split.get(s)
                cells += (["-"] * 4 if r is None else
                          [_docs_cell(r), f"{r['extracted']}/{r['docs']}", f"{r['rate']:.1%}",
                           f"{r['mean_best_similarity']:.3f}"])
                if r is not None and r.get("selection", {}).get("source"):
                    sources.setdefault((dom, s, r["selection"]["source"]), []).append(name)
            lines.append("| " + " | ".join(cells) + " |")
    if sources:
        lines += ["", "Documents checked:"]
        per = {}
        for dom, s, _ in sources:
            per[dom, s] = per.get((dom, s), 0) + 1
        for (dom, s, src), names in sources.items():
            who = f" ({', '.join(names)})" if per[dom, s] > 1 else ""
            lines.append(f"- {dom} {s}{who}: {src}")
    return "\n".join(lines)


def write_json(path, results: Mapping) -> Path:
    """Write results as JSON atomically (a half-written file never appears under ``path``)."""
    return storage.write_json(path, results, sort_keys=False)
