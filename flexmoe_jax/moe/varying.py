"""Loop-carry typing under ``shard_map``: mark fresh arrays as varying over the inputs' mesh axes."""

from __future__ import annotations

import jax


def varying_like(tree, *refs):
    """Mark fresh loop carries (zeros) as varying over the mesh axes the inputs vary over.

    Inside ``shard_map`` a loop carry must keep its type, and a block's output
    varies over whatever axes its inputs do; outside ``shard_map`` a no-op.
    """
    def varying(a):
        aval = jax.typeof(a)
        mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; older releases called it .vma
        return set(mat.varying if mat is not None else getattr(aval, "vma", None) or ())

    axes = set().union(*map(varying, refs))

    def cast(z):
        missing = tuple(sorted(axes - varying(z)))
        return jax.lax.pcast(z, missing, to="varying") if missing else z

    return jax.tree.map(cast, tree) if axes else tree

