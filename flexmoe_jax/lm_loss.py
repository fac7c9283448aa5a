"""The language-model loss's per-token statistics, computed a chunk of positions at a time.

The output head's logits are the largest activation of a training step at a real vocabulary: fp32
``[rows, seq, vocab]`` per chip (2.1 GB for 8 rows of 2048 tokens at vocab 32000), and its gradient
as much again. :func:`logit_stats` gives what the loss needs of them, each token's logsumexp and its
target's logit, from the final hidden states and the head's weights: the sequence is cut into
chunks of at most ``chunk`` positions, a scan computes one chunk's logits at a time, and
``jax.checkpoint`` makes the backward pass recompute them chunk by chunk, so only one chunk's logits
are ever live. The price is one more forward of the head (the backward recomputes each chunk's
logits, as a fully rematerialized step does for every layer): 1.07e12 FLOPs per chip on the v5p-8
mixtral step, +3.6% of its matmuls. A sequence no longer than ``chunk`` is computed whole, exactly
as the model's own forward computes its logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flexmoe_jax.sharding import constrain


def num_chunks(seq_len: int, chunk: int) -> int:
    """The fewest equal chunks of ``seq_len`` positions, none longer than ``chunk`` (0: one chunk)."""
    if chunk <= 0 or seq_len <= chunk:
        return 1
    return next(n for n in range(-(-seq_len // chunk), seq_len + 1) if seq_len % n == 0)


def logit_stats(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, chunk: int,
                mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """(logsumexp, target logit), both fp32 ``[B, S]``, of ``hidden [B, S, d] @ lm_head [d, V]``.

    ``hidden`` is the final normalized residual stream in the compute dtype (the head is cast to it,
    the dot accumulates in fp32, as :class:`flexmoe_jax.transformer.Transformer` does); ``targets``
    ``[B, S]`` int. At most ``chunk`` positions' logits exist at once, forward and backward.
    """
    w = lm_head.astype(hidden.dtype)

    def stats(x, t):
        logits = constrain(jnp.dot(x, w, preferred_element_type=jnp.float32), ("batch", "length", "act_vocab"), mesh)
        return jax.nn.logsumexp(logits, axis=-1), jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]

    b, s, d = hidden.shape
    n = num_chunks(s, chunk)
    if n == 1:
        return stats(hidden, targets)
    # The head gathered once for all chunks (as the unchunked dot needs it), not once per chunk.
    w = constrain(w, (None, "act_vocab"), mesh)
    xs = hidden.reshape(b, n, s // n, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, s // n).swapaxes(0, 1)
    _, (lse, tgt) = jax.lax.scan(jax.checkpoint(lambda carry, xt: (carry, stats(*xt))), None, (xs, ts))
    return lse.swapaxes(0, 1).reshape(b, s), tgt.swapaxes(0, 1).reshape(b, s)
