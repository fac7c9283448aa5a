"""The demo's sizes (:class:`Plan`, :data:`QUICK`, :data:`FULL`) and the plan file a work directory keeps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import FlexmoeError

PLAN_FILE = "demo_plan.json"


class DemoError(FlexmoeError, RuntimeError):
    """The demo cannot go on; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one demo mode (everything else is shared between modes)."""

    mode: str
    # data
    max_docs_per_domain: int | None
    vocab_size: int
    # the dense anchor (experts inherit it)
    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden: int
    max_seq_len: int
    # training (every phase uses the same batch shape)
    batch_size: int
    seq_len: int
    anchor_steps: int
    expert_steps: int
    btx_steps: int
    router_tune_steps: int
    unrestricted_experts: int = 6
    top_k: int = 2
    peak_lr: float = 3e-3
    # Share of public rows in the "_replay" experts' training (RunConfig.public_replay).
    public_replay: float = 0.3
    # router tuning proxy data
    rt_per_expert: int = 64
    rt_public: int = 128
    rt_pool: int = 1024
    calibration_batches: int = 8
    # weighted soup: Adam steps on the mixing weights, one public validation batch each
    soup_weight_steps: int = 32
    # evaluation
    eval_batch_size: int = 16
    mc_items: int = 20
    # Each domain's evaluation sample: whole test documents drawn with a fixed seed up to this many
    # tokens (None: the whole test split); the same documents for every model, bpb, routing and MC.
    eval_tokens: int | None = None
    # ... and each document longer than this is scored on one seeded window of about this many tokens
    # (None: every token). Long documents then cost their window, not their length (docs/evaluation.md).
    eval_doc_tokens: int | None = None
    privacy_docs: int = 16
    # mixed-domain evaluation documents (flexmoe_jax.data.mixed), from the closed domains' test splits
    mixed_docs: int = 240
    # cap on each closed domain's training split (UTF-8 bytes; held-out splits unchanged): owners'
    # data small beside the public data, as in the paper (None: the data build's own caps)
    max_train_bytes_closed: int | None = None

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, mlp_hidden=self.mlp_hidden, max_seq_len=self.max_seq_len)


QUICK = Plan(mode="quick", max_docs_per_domain=80, vocab_size=512, d_model=64, n_layers=2, n_heads=4,
             mlp_hidden=128, max_seq_len=128, batch_size=8, seq_len=64, anchor_steps=60, expert_steps=20,
             btx_steps=10, router_tune_steps=10, rt_per_expert=8, rt_public=16, rt_pool=64,
             calibration_batches=2, soup_weight_steps=8, eval_batch_size=16, mc_items=5, privacy_docs=4,
             mixed_docs=40)
# The full demo before the paper-regime plan (issue 29), kept for comparison (`flexmoe demo --plan
# inverted`): its regime is inverted from the paper's (anchor 0.12 tokens per parameter, embeddings
# and head 47% of the parameters, experts seeing 0.07-0.12 epochs of their domain).
FULL_INVERTED = Plan(mode="inverted", max_docs_per_domain=None, vocab_size=4096, d_model=192, n_layers=4,
                     n_heads=3, mlp_hidden=512, max_seq_len=512, batch_size=16, seq_len=128, anchor_steps=200,
                     expert_steps=32, btx_steps=32, router_tune_steps=24, mc_items=8, privacy_docs=8)
# The full demo, proportioned like the paper (docs/demo.md, "The plan"; sizes chosen from 50 timed
# steps of each phase, bench/bench_plan.py).
FULL = Plan(mode="full", max_docs_per_domain=None, vocab_size=768, d_model=64, n_layers=6, n_heads=2,
            mlp_hidden=256, max_seq_len=512, batch_size=16, seq_len=128, anchor_steps=1600, expert_steps=80,
            btx_steps=32, router_tune_steps=24, mc_items=8, privacy_docs=8, max_train_bytes_closed=500_000)
PLANS = {p.mode: p for p in (QUICK, FULL, FULL_INVERTED)}


def select(quick: bool = False, plan: str | None = None) -> Plan:
    """The plan of a demo run: ``--quick``, else ``plan`` (a :data:`PLANS` name; default ``full``)."""
    if quick:
        if plan not in (None, "quick"):
            raise DemoError(f"--quick is its own plan; drop --plan {plan}")
        return QUICK
    if plan is None:
        return FULL
    if plan not in PLANS or plan == "quick":
        raise DemoError(f"unknown demo plan {plan!r}; known: {', '.join(k for k in PLANS if k != 'quick')} "
                        "(or --quick)")
    return PLANS[plan]


def recorded(root: str | Path, quick: bool = False) -> Plan:
    """The plan a finished demo in ``root`` ran with (its plan file's mode), else :func:`select` of ``quick``."""
    f = Path(root) / PLAN_FILE
    if f.exists():
        mode = json.loads(f.read_text()).get("mode")
        if mode in PLANS and (mode == "quick") == bool(quick):
            return PLANS[mode]
    return select(quick)


def claim(root: Path, plan: Plan) -> None:
    """Write ``plan`` to ``root/PLAN_FILE``, or check it against the one there.

    Raises DemoError when ``root`` holds a run of other settings (its models have other sizes).
    """
    f = root / PLAN_FILE
    mine = dataclasses.asdict(plan)
    if f.exists():
        theirs = json.loads(f.read_text())
        if theirs != mine:
            other = theirs.get("mode", "?")
            diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
            raise DemoError(f"{root} holds a demo run of mode {other!r} whose settings differ from this "
                            f"{plan.mode!r} run's ({', '.join(diff)}); pass another --workdir or delete "
                            f"{root}")
    else:
        f.write_text(json.dumps(mine, indent=2) + "\n")
