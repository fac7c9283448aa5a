"""One process of the two-process ``flexmoe train`` test in test_trainer_faults.py.

Run as ``python tests/_mp_trainer_worker.py RUNS_JSON`` with the JAX_* variables read by
``flexmoe_jax.distributed`` set (coordinator address, process count, process id).
RUNS_JSON holds a list of command lines (argument lists); each goes through the real
command line, ``flexmoe_jax.cli.main``, which joins the distributed runtime before any
JAX work. Several runs share this process (and its one distributed runtime) only to
pay the imports once. Exits with the first non-zero status.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def main(runs_json: str) -> int:
    from flexmoe_jax import cli

    with open(runs_json) as f:
        runs = json.load(f)
    for argv in runs:
        rc = cli.main(argv)
        print(f"flexmoe {' '.join(argv[:1])} -> exit status {rc}", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
