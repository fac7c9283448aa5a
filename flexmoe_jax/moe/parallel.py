"""Expert parallelism: dropless dispatch inside a ``shard_map``, each device running only its experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from flexmoe_jax.moe.dispatcher import choose_impl, dispatch_one
from flexmoe_jax.moe.experts import Experts, stack_experts
from flexmoe_jax.moe.router import Routing


def local_routing(r: Routing, first: jax.Array, num_local: int) -> Routing:
    """Routing restricted to experts [first, first + num_local), renumbered from 0.

    Assignments to any other expert get index ``num_local`` ("held elsewhere")
    and weight 0, which every dispatch path skips.
    """
    local = r.index - first
    mine = (local >= 0) & (local < num_local)
    return Routing(r.logits, jnp.where(mine, r.weights, jnp.zeros_like(r.weights)),
                   jnp.where(mine, local, num_local).astype(jnp.int32))


def _entry(names: tuple[str, ...]):
    return None if not names else names if len(names) > 1 else names[0]


def dispatch_sharded(x: jax.Array, r: Routing, w: Experts | tuple[Experts, ...], mesh: Mesh,
                     impl: str = "auto", block_size: int = 512) -> jax.Array:
    """Expert-parallel dropless dispatch on ``mesh``: x [T, d] -> [T, d], same result as :func:`dispatch`.

    Tokens split over the batch axes (data, fsdp, expert), expert tensors [E, d, h] over
    (expert, fsdp, tensor), by the one rules table. Each device gathers its expert group's
    tokens, runs only its own experts (any dispatch path) and reduce-scatters the mixed
    outputs back; axes that do not divide a dim leave it whole. The path runs per device, so
    Pallas kernels (gmm, chosen for TPU meshes) need no GSPMD partitioning. Scheme: docs/model.md
    (Expert parallelism).
    """
    from flexmoe_jax.sharding import split_axes  # (sharding imports flax; keep moe importable alone)

    w = stack_experts((w,) if isinstance(w, Experts) else tuple(w))
    e, d, h = w.gate.shape
    t, k = r.index.shape
    backend = mesh.devices.flat[0].platform  # the mesh's, not the host's: an AOT compile for TPU picks gmm
    (tok,) = split_axes(mesh, ("batch",), (t,))
    ex, emb, mlp = split_axes(mesh, ("expert", "embed", "mlp"), (e, d, h))
    local_h = h // int(np.prod([mesh.shape[a] for a in mlp], dtype=int))  # embed is gathered, hidden stays split
    impl = choose_impl(impl, k, e, backend, (d, local_h))
    (_, mlp_down, emb_down) = split_axes(mesh, ("expert", "mlp", "embed"), (e, h, d))
    assert (mlp_down, emb_down) == (mlp, emb), "gate/up and down must split hidden and embed alike"
    # Tokens are gathered over the axes that split the experts too; those must
    # be the minor end of the token split for the gathered rows to be contiguous.
    group = tuple(a for a in tok if a in ex)
    if group != tok[len(tok) - len(group):]:
        tok, group = (), ()
    rest = tuple(a for a in ex if a not in group)  # split experts, replicated tokens: a plain sum

    def body(x, weights, index, wg, wu, wd):
        if group:
            x, weights, index = (jax.lax.all_gather(a, group, axis=0, tiled=True) for a in (x, weights, index))
        if emb:
            wg, wu = (jax.lax.all_gather(a, emb, axis=1, tiled=True) for a in (wg, wu))
            wd = jax.lax.all_gather(wd, emb, axis=2, tiled=True)
        n_local = wg.shape[0]
        first = jax.lax.axis_index(ex) * n_local if ex else 0
        mine = local_routing(Routing(None, weights, index), first, n_local)
        y = dispatch_one(x, mine, Experts(wg, wu, wd), impl, block_size, backend)
        if group:
            y = jax.lax.psum_scatter(y, group, scatter_dimension=0, tiled=True)
        if rest or mlp:
            y = jax.lax.psum(y, rest + mlp)
        return y

    tok_spec = P(_entry(tok))
    w_spec = P(_entry(ex), _entry(emb), _entry(mlp))
    wd_spec = P(_entry(ex), _entry(mlp), _entry(emb))
    # megablox's pallas_calls declare no varying mesh axes on their outputs: gmm runs unchecked.
    f = jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, w_spec, w_spec, wd_spec),
                      out_specs=tok_spec, check_vma=impl != "gmm")
    return f(x, r.weights, r.index, w.gate, w.up, w.down)

