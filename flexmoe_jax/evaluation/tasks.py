"""Which tasks an evaluation covers: short domain names <-> seqio task names, and the shared defaults."""


from typing import Sequence

from flexmoe_jax.errors import UserError

# The sequence length every phase in gin_configs/ trains at: evaluating longer would measure RoPE
# extrapolation rather than the model. Capped at the model's max_seq_len.
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 16
PUBLIC = "public"
AVERAGE = "average"


def short_name(task: str) -> str:
    """``flexmix_mini.humor`` -> ``humor``; ``flexmix_mini.public`` -> ``public``; others unchanged."""
    from flexmoe_jax.data import layout as L

    return task[len(L.TASK_PREFIX):] if task.startswith(L.TASK_PREFIX) else task


def default_tasks(data_dir) -> list[str]:
    """Every closed domain built in ``data_dir`` (in ``CLOSED_DOMAINS`` order), every owner task registered
    there (``flexmoe data register``; evaluation-only tasks such as the mixed documents are asked for by
    name), then the public mixture."""
    from flexmoe_jax import data
    from flexmoe_jax.data import tasks as data_tasks

    known = set(data.register_tasks(data_dir))
    out = [f"{data.TASK_PREFIX}{d}" for d in data.CLOSED_DOMAINS if f"{data.TASK_PREFIX}{d}" in known]
    out += [n for n, m in data_tasks.owner_manifests(data_dir).items() if m.get("kind") != "evaluation" and n in known]
    if data.PUBLIC_MIXTURE in known:
        out.append(data.PUBLIC_MIXTURE)
    return out


def resolve_tasks(data_dir, tasks: Sequence[str] | None) -> list[str]:
    """Task names from short domain names (``humor``, ``public``), full names, or owners' task names."""
    from flexmoe_jax import data

    if tasks is None:
        out = default_tasks(data_dir)
        if not out:
            raise UserError(f"no FlexMix-mini tasks in {data_dir}: run `flexmoe data build` first")
        return out
    known = data.register_tasks(data_dir)
    out = []
    for t in tasks:
        full = data.PUBLIC_MIXTURE if t == PUBLIC else t if t in known else f"{data.TASK_PREFIX}{t}"
        if full not in known or full == data.ALL_MIXTURE:
            usable = sorted(short_name(k) for k in known if k != data.ALL_MIXTURE and k not in
                            [f"{data.TASK_PREFIX}{s}" for s in data.PUBLIC_SOURCES])
            raise UserError(f"unknown task {t!r} in {data_dir}; known: {', '.join(usable)}")
        if full not in out:
            out.append(full)
    return out
