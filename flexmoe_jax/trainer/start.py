"""The parameters a phase starts from: a fresh init (pretrain), or the anchor checkpoint (or anchor kit)
as it is (dense, router_tune) or upcycled into a public + owner 2-expert model (expert)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from flexmoe_jax import expert, loading, model, storage
from flexmoe_jax.config import SHAPE_FIELDS, ModelConfig, arch_diff
from flexmoe_jax.errors import UserError
from flexmoe_jax.trainer.run_config import RunConfig


def initial_params(config: ModelConfig | None, rc: RunConfig) -> tuple[ModelConfig, Any, dict]:
    """(config, full params on the host, provenance for the outputs' metadata) for ``rc.phase``.

    Raises UserError when pretraining has no ``config``, or a ``config`` given with an anchor
    disagrees with the anchor's shape, or an anchor kit does not match its fingerprint.
    """
    if rc.phase == "pretrain":
        if config is None:
            raise UserError("pretraining needs a ModelConfig")
        return config, jax.device_get(model.init(config, rc.seed)), {}
    kit, anchor_config, anchor_params, provenance = _load_anchor(config, rc)
    if rc.phase == "expert":
        return _upcycle(kit, anchor_config, anchor_params, provenance, rc)
    if rc.phase == "dense":
        provenance["dense_expert"] = rc.expert_name or rc.task.split(".")[-1]
    return anchor_config, jax.device_get(anchor_params), provenance


def _load_anchor(config: ModelConfig | None, rc: RunConfig):
    """(kit or None, anchor config, anchor params, provenance) of ``rc.anchor``, checked against ``config``."""
    kit = None
    if rc.phase in ("expert", "dense"):
        from flexmoe_jax import anchor_kit

        if anchor_kit.is_kit(rc.anchor):  # the builder's kit: its anchor, public row and router-init method
            kit = anchor_kit.open_kit(rc.anchor)
    # any kind of checkpoint: router tuning starts from a merged model
    anchor_config, anchor_params = loading.load(kit.anchor if kit else rc.anchor)
    if config is not None:
        diff = arch_diff(config, anchor_config, SHAPE_FIELDS)
        if diff:
            raise UserError(f"the configured model differs from the anchor {rc.anchor}: "
                            + ", ".join(f"{k}={a} vs anchor {b}" for k, (a, b) in diff.items())
                            + "; drop the ModelConfig settings (the anchor defines the model) or use the right anchor")
    provenance = {"anchor": str(storage.resolve(rc.anchor)),
                  "anchor_fingerprint": expert.fingerprint(anchor_config, anchor_params)}
    if kit is not None:
        if provenance["anchor_fingerprint"] != kit.meta["anchor_fingerprint"]:
            raise UserError(f"anchor kit {kit.path}: its model/ does not match the fingerprint in its kit.json; "
                            "the kit is damaged (re-copy it from the model builder)")
        provenance["anchor_kit"] = kit.kit_id
    return kit, anchor_config, anchor_params, provenance


def _upcycle(kit, anchor_config: ModelConfig, anchor_params, provenance: dict, rc: RunConfig):
    """The expert phase's start: the anchor plus the owner's expert, its router row made by ``rc.router_init``
    (or by the kit's method, beside the kit's public row)."""
    from flexmoe_jax import data, router_init

    data.register_tasks(rc.data_dir)
    anchor_params = jax.device_get(anchor_params)
    batch_size = max(rc.batch_size // max(jax.process_count(), 1), 1)

    def sample(task):  # the domain's own training documents, in another order than training's
        return data.batches(task, "train", batch_size, rc.seq_len, rc.data_dir, seed=rc.seed + 1)

    if kit is not None:  # row 0 is the kit's; the owner computes only its own row, by the kit's method
        own = kit.owner_row(anchor_config, anchor_params, data_dir=rc.data_dir, task=rc.task, seq_len=rc.seq_len,
                            seed=rc.seed, num_batches=rc.router_init_batches, num_docs=rc.router_init_docs)
        rows = np.stack([kit.public_row(), own], axis=1).astype(np.float32)
        cfg, params = expert.upcycle(anchor_config, anchor_params, rc.expert_name, router_rows=rows,
                                     bias_init=rc.bias_init)
        provenance.update(router_init=kit.method, bias_init=rc.bias_init)
        return cfg, params, provenance
    init_info: dict = {}  # how the rows were made, beyond the method's name (for the manifest)
    rows = router_init.rows(rc.router_init, anchor_config, anchor_params,
                            sample(rc.public_task) if rc.router_init == "hidden" else None,
                            sample(rc.task) if rc.router_init == "hidden" else None,
                            num_batches=rc.router_init_batches, seed=rc.seed, data_dir=rc.data_dir,
                            public_task=rc.public_task, task=rc.task, num_docs=rc.router_init_docs,
                            seq_len=rc.seq_len, info=init_info)
    cfg, params = expert.upcycle(anchor_config, anchor_params, rc.expert_name, router_rows=rows,
                                 bias_init=rc.bias_init)
    provenance["router_init"] = rc.router_init
    provenance["bias_init"] = rc.bias_init
    if init_info:
        provenance["router_init_info"] = init_info
    return cfg, params, provenance
