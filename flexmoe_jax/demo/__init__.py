"""The FlexOlmo mini-replication (``flexmoe demo``): plan, phases, report, routing ablations and core checks.

Modules, lowest first: plan, workdir, datasets, training, experts, merging, budget, baselines, scoring,
lineup, mixed_docs, report, replication (:func:`run`), ablations, checks, command (:func:`main`). See docs/demo.md.
"""

from flexmoe_jax.demo.command import main
from flexmoe_jax.demo.datasets import owner_data_dir
from flexmoe_jax.demo.plan import FULL, FULL_INVERTED, PLAN_FILE, PLANS, QUICK, DemoError, Plan
from flexmoe_jax.demo.replication import run
from flexmoe_jax.demo.report import findings, findings_text, write_report
from flexmoe_jax.demo.workdir import RESULTS, Workdir

__all__ = ["FULL", "FULL_INVERTED", "PLAN_FILE", "PLANS", "QUICK", "RESULTS", "DemoError", "Plan", "Workdir",
           "findings", "findings_text", "main", "owner_data_dir", "run", "write_report"]
