"""Where restored arrays land: the abstract target tree (shapes, dtypes, shardings) of a model, whole or
pruned to some subtrees, or of any tree placed like another (:func:`sharded_like`: the training state),
and the Orbax restore into it.

:func:`targets` raises :class:`UserError` for a sharding tree of another structure (or both ``mesh``
and ``shardings``); :func:`prune` raises :class:`UnknownName` for a subtree the model does not have.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UnknownName, UserError

if TYPE_CHECKING:  # pragma: no cover
    from jax.sharding import Mesh


def placement(config: ModelConfig, like: Any, mesh=None, shardings=None) -> Any:
    """The sharding of every array of a parameter tree shaped like ``like``: by the logical-axis rules
    on ``mesh``, one ``Sharding`` for all, a tree of them, or (neither) the first local device."""
    import jax
    from jax.sharding import Sharding, SingleDeviceSharding

    from flexmoe_jax import model as model_lib

    if mesh is not None and shardings is not None:
        raise UserError("give either mesh or shardings, not both")
    if mesh is not None:
        return model_lib.param_shardings(config, mesh)
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda _: shardings, like)
    if shardings is not None:
        return shardings
    return jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), like)


def targets(config: ModelConfig, stored: Any, mesh: Mesh | None, shardings: Any,
            dtype: Any) -> tuple[ModelConfig, Any]:
    """(config with the wanted ``param_dtype``, target tree): stored shapes, the wanted dtype and sharding.

    ``stored`` is the stored arrays' metadata tree (checked to match ``config``); each keeps its
    stored dtype unless ``dtype`` is given. Sharding: ``mesh`` -> the model's own parameter
    shardings; ``shardings`` -> that tree, or one Sharding for every array; else the first local device.
    """
    import jax
    import jax.numpy as jnp

    from flexmoe_jax import model as model_lib

    shapes = model_lib.param_shapes(config)
    shard_tree = placement(config, shapes, mesh, shardings)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        config = config.replace(param_dtype=dtype.name)
    try:
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(
            tuple(m.shape), m.dtype if dtype is None else dtype, sharding=s), stored, shard_tree)
    except ValueError as e:
        raise UserError(f"shardings must be a tree with the same structure as the params: {e}") from None
    return config, target


def sharded_like(like: Any, shardings: Any = None) -> Any:
    """The abstract restore target of a tree shaped like ``like``: its shapes and dtypes, each leaf on its
    ``shardings`` leaf (a tree of ``like``'s structure; None: each array's own sharding)."""
    import jax

    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    try:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
    except ValueError as e:
        raise UserError(f"shardings must be a tree with the same structure as the restored state: {e}") from None


def key_path(key: str | Sequence[str]) -> tuple[str, ...]:
    """``"a/b/c"`` or ``("a", "b", "c")`` -> ``("a", "b", "c")``."""
    parts = tuple(p for p in key.split("/") if p) if isinstance(key, str) else tuple(key)
    if not parts or not all(isinstance(p, str) for p in parts):
        raise UserError(f"a subtree key is 'a/b/c' or a tuple of names, got {key!r}")
    return parts


def prune(tree: dict, keys: list[tuple[str, ...]]) -> dict:
    """The part of a nested dict under any of ``keys`` (each a path of names), as a new dict."""
    for parts in keys:
        node = tree
        for i, name in enumerate(parts):
            if not isinstance(node, dict) or name not in node:
                where = "/".join(parts[:i]) or "the top level"
                have = sorted(node) if isinstance(node, dict) else "a single array"
                raise UnknownName(f"no parameter subtree {'/'.join(parts)!r}: {where} has {have}")
            node = node[name]

    def walk(node: Any, prefix: tuple[str, ...]) -> Any:
        if any(prefix[:len(k)] == k for k in keys):
            return node  # inside a requested subtree: keep all of it
        # On the way to a requested subtree: keep only the children that lead to one.
        return {name: walk(child, prefix + (name,)) for name, child in node.items()
                if any(k[:len(prefix) + 1] == prefix + (name,) for k in keys)}

    return walk(tree, ())


def restore(params_dir: Path, target: Any, what: str, partial: bool = False) -> Any:
    """The arrays of the Orbax tree ``params_dir`` restored into ``target`` (``partial``: only its leaves)."""
    import orbax.checkpoint as ocp

    from flexmoe_jax import array_store

    args = ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)
    return array_store.restore(params_dir, args, what)
