"""`flexmoe data register` on a large owner corpus: wall time and peak memory, streaming.

    python bench/bench_register.py --data_dir DIR [--gb 1.0] [--quick]

Writes ``--gb`` GB of generated documents (distinct pseudo-random word sequences, ~4 KB each, 5%
exact duplicates) as Dolma-style ``documents/part-*.json.gz`` shards in a temporary directory, then
registers them into ``--data_dir`` (which needs the anchor's tokenizer: ``flexmoe data build``) in a
child process, and prints its wall time, documents per second and peak resident memory (the child's
``ru_maxrss``). The registration streams (flexmoe_jax.data.readers, flexmoe_jax.data.spool): memory
holds one digest per distinct document and the tfds writer's buffers, not the corpus. A benchmark:
it measures and prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = ("the patient nurse record bed slept hours ward doctor note morning evening fever normal "
         "blood pressure stable discharged admitted medication dose daily review follow up plan").split()


def write_corpus(root: str, gb: float, doc_bytes: int = 4096, per_shard: int = 20_000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    docs_dir = os.path.join(root, "documents")
    os.makedirs(docs_dir)
    target, written, n, shard, f = int(gb * 1e9), 0, 0, 0, None
    while written < target:
        if n % per_shard == 0:
            if f:
                f.close()
            f = gzip.open(os.path.join(docs_dir, f"part-{shard:05d}.json.gz"), "wt", compresslevel=1)
            shard += 1
        words = rng.integers(len(WORDS), size=doc_bytes // 6)
        text = f"doc {n}: " + " ".join(WORDS[w] for w in words)
        for _ in range(2 if rng.random() < 0.05 else 1):  # 5% written twice: exact duplicates
            f.write(json.dumps({"id": str(n), "text": text}) + "\n")
            written += len(text)
        n += 1
    f.close()
    return {"docs": n, "bytes": written, "shards": shard}


CHILD = """
import resource, sys, time
from flexmoe_jax import data
t = time.perf_counter()
man = data.register(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, overwrite=True, log=lambda m: None)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      sum(r["docs"] for r in man["splits"].values()), man["duplicates"])
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="0.05 GB")
    args = ap.parse_args(argv)
    gb = 0.05 if args.quick else args.gb
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        corpus = write_corpus(tmp, gb)
        gen_s = time.perf_counter() - t
        out = subprocess.run([sys.executable, "-c", CHILD, "bench_owner", os.path.join(tmp, "documents"),
                              args.data_dir], capture_output=True, text=True, check=True)
        secs, rss_kb, kept, dups = out.stdout.split()[-4:]
    secs, rss = float(secs), int(rss_kb) / 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# generated {corpus['bytes'] / 1e9:.2f} GB in {corpus['shards']} .json.gz shards ({gen_s:.0f} s); "
          f"{os.cpu_count()} cpus; peak RSS of this (generating) process {own:.0f} MB")
    print("\n| corpus | documents kept | duplicates dropped | wall s | MB/s | peak RSS MB (register) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {corpus['bytes'] / 1e9:.2f} GB | {int(kept):,} | {int(dups):,} | {secs:.0f} | "
          f"{corpus['bytes'] / 1e6 / secs:.1f} | {rss:,.0f} |")


if __name__ == "__main__":
    main()
