"""The training state on disk: one Orbax ``CheckpointManager`` under ``WORKDIR/state`` holding the trainable
params, their optimizer state, the step and the data position; restored on resume, cleaned up after a failed save."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax

from flexmoe_jax import array_store, checkpoint, restore_targets, storage
from flexmoe_jax.trainer.run_config import RunConfig, TrainingError


def manager(workdir: Path, rc: RunConfig):
    """The run's CheckpointManager (async saves, ``rc.keep_checkpoints`` kept, crc32c-checked arrays)."""
    import orbax.checkpoint as ocp

    # cleanup_tmp_directories: a save cut short (killed, disk full) leaves an unfinished
    # "N.orbax-checkpoint-tmp" directory; never restored from, and removed here on the next run.
    options = ocp.CheckpointManagerOptions(max_to_keep=rc.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True, cleanup_tmp_directories=True)
    # The state's arrays carry a crc32c per chunk, checked when a resume reads them (array_store).
    return ocp.CheckpointManager(workdir / "state", options=options,
                                 item_handlers={"state": array_store.pytree_handler(),
                                                "data": ocp.JsonCheckpointHandler()})


def restore(mngr, step: int, like: Any, state_dir: Path, shardings: Any = None) -> dict:
    """``{"state": train state shaped like ``like``, "data": data iterator state}`` of ``step``.

    Each array lands on its leaf of ``shardings`` (a tree like ``like``: ``train.state_shardings``, so
    every optimizer-state leaf is sharded like its parameter), or without it on ``like``'s own sharding.
    A damaged state raises the error :func:`array_store.state_error` names (it is never trained on).
    """
    import orbax.checkpoint as ocp

    abstract = restore_targets.sharded_like(like, shardings)
    try:
        return mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
            data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - a damaged state must not be trained on; say which
        err = array_store.state_error(e, state_dir / str(step))
        if err is None:
            raise
        raise err from e


def save(mngr, step: int, state: Any, data_state: dict) -> None:
    """Start the (async) save of ``state`` and the data position at ``step``."""
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)))


def guarded(mngr, state_dir: Path, before_raise: Callable[[], Any], fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``; a failed write of the training state becomes one clear TrainingError
    (:func:`save_failed`), raised after ``before_raise()`` (e.g. closing the progress bar)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        err = save_failed(e, mngr, state_dir)
        if err is None:
            raise
        before_raise()
        raise err from e


def last_complete_step(state_dir: Path) -> int | None:
    # Orbax's finalized steps: renamed from their temporary name locally, marked commit_success.txt on gs://.
    import orbax.checkpoint as ocp

    return max(ocp.utils.checkpoint_steps(state_dir), default=None)


def _remove_partial_steps(state_dir: Path) -> None:
    """Delete the unfinished "N.orbax-checkpoint-tmp" directories of a failed save (and keep them gone)."""
    def remove() -> bool:
        partial = list(state_dir.glob("*.orbax-checkpoint-tmp*"))
        for tmp in partial:
            try:
                storage.remove_tree(tmp)
            except OSError:
                pass
        return bool(partial)

    checkpoint.remove_leftovers(remove)


def save_failed(e: Exception, mngr, state_dir: Path) -> TrainingError | None:
    """One clear error for a failed write of the training state (None: ``e`` is no I/O failure).

    Waits for the background save, removes its partial step directory (the space it
    holds is often what the disk lacks) and names the last complete step, which a
    rerun of the same command resumes from.
    """
    io = checkpoint.io_error(e)
    if io is None:
        return None
    try:
        mngr.wait_until_finished()
    except Exception:  # noqa: BLE001 - the same failure, reported again
        pass
    if jax.process_index() == 0:
        _remove_partial_steps(state_dir)
    last = last_complete_step(state_dir)
    code, reason = io
    kept = (f"the last complete checkpoint, step {last}, is intact" if last is not None
            else "no checkpoint was completed yet")
    resume = f"resume from step {last}" if last is not None else "start again"
    return TrainingError(f"cannot save the training state in {state_dir}: {reason}; the partial write was removed "
                         f"and {kept}. To fix: {checkpoint.io_fix(code, state_dir)}, then rerun the same "
                         f"command to {resume}")
