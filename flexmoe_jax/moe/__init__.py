"""FlexOlmo routing and dropless expert dispatch, as pure functions (no flax).

- :mod:`~flexmoe_jax.moe.router`: router logits, softmax over all experts, top-k.
- :mod:`~flexmoe_jax.moe.experts`: the experts' weights.
- :mod:`~flexmoe_jax.moe.dispatcher`: :func:`dispatch` and its dense and ragged paths.
- :mod:`~flexmoe_jax.moe.blocks`: the block-sparse CPU path.
- :mod:`~flexmoe_jax.moe.grouped`: the TPU path, megablox grouped matmuls (imported when used: it loads Pallas).
- :mod:`~flexmoe_jax.moe.parallel`: expert parallelism on a mesh.

Design and measurements: docs/model.md.
"""

from flexmoe_jax.moe.blocks import dispatch_blocks
from flexmoe_jax.moe.dispatcher import choose_impl, dispatch, dispatch_dense, dispatch_ragged
from flexmoe_jax.moe.experts import Experts, stack_experts
from flexmoe_jax.moe.parallel import dispatch_sharded, local_routing
from flexmoe_jax.moe.router import Routing, gate_matrix, route, router_logits, router_z_loss, segment_cumsum

__all__ = ["Experts", "Routing", "choose_impl", "dispatch", "dispatch_blocks", "dispatch_dense", "dispatch_ragged",
           "dispatch_sharded", "gate_matrix", "local_routing", "route", "router_logits", "router_z_loss",
           "segment_cumsum", "stack_experts"]
