"""Weights for a weighted model soup, fit on public data only.

The paper's soup baseline averages the dense experts (uniform, and weighted). A model builder who
must not see the owners' data can only choose soup weights with data it may hold: public text. This
module fits the mixing weights ``w = softmax(z)`` of the soup ``sum_i w_i theta_i`` by gradient
descent on the soup's own next-token loss over public batches (the gradient flows through the
averaged parameters into ``z``). It is the best single soup a builder can pick without closed
data, which is why it is reported beside the uniform soup: where it moves weight towards the public
model, closed domains lose what the dense experts learned, and the table shows by how much.

Members are stacked along a new leading axis once, so each step is one forward/backward pass of one
model plus a weighted sum over the stack; the tiny demo models fit this many times over.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexmoe_jax import model
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError


def _stack(views: Sequence[tuple[ModelConfig, model.Params]]):
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs]), *[p for _, p in views])


def _mix(stacked, w):
    return jax.tree.map(lambda s: jnp.tensordot(w, s, axes=1), stacked)


def _ce(config: ModelConfig, params, batch) -> jax.Array:
    logits = model.apply(config, params, batch["decoder_input_tokens"], batch["decoder_positions"],
                         batch["decoder_segment_ids"])[0].astype(jnp.float32)
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def fit(models: Sequence[tuple[ModelConfig, model.Params]], batches: Iterable[dict], *, steps: int = 32,
        learning_rate: float = 0.1, num_eval_batches: int = 4) -> tuple[np.ndarray, dict]:
    """Soup weights for ``models`` (dense models or owners' 2-expert models; see
    :func:`flexmoe_jax.eval.soup`) fit on ``batches``, which must be public data.

    The first ``num_eval_batches`` batches are held back to report the public loss of the uniform and
    the fitted soup (so the report says what fitting bought on data it did not fit); the next
    ``steps`` batches train ``z``. Returns (weights summing to 1, report).
    """
    from flexmoe_jax.eval import dense_view, soup

    if len(models) < 2:
        raise UserError(f"a weighted soup needs at least two members, got {len(models)}")
    if steps < 1:
        raise UserError(f"soup weight fitting needs steps >= 1, got {steps}")
    soup(models)  # same architecture for every member, or a clear error naming the member
    views = [dense_view(c, p) for c, p in models]
    config = views[0][0]
    stacked = _stack(views)
    it = iter(batches)
    held = list(itertools.islice(it, num_eval_batches))
    train = list(itertools.islice(it, steps))
    if len(train) < steps or (num_eval_batches and len(held) < num_eval_batches):
        raise UserError(f"soup weight fitting needs {num_eval_batches + steps} public batches; the iterator "
                        f"gave {len(held) + len(train)}. Use a repeating (training) batch iterator")
    opt = optax.adam(learning_rate)

    @jax.jit
    def step(z, opt_state, batch):
        loss, g = jax.value_and_grad(lambda z: _ce(config, _mix(stacked, jax.nn.softmax(z)), batch))(z)
        updates, opt_state = opt.update(g, opt_state, z)
        return optax.apply_updates(z, updates), opt_state, loss

    @jax.jit
    def held_loss(w):
        return jnp.mean(jnp.stack([_ce(config, _mix(stacked, w), b) for b in held])) if held else jnp.nan

    z = jnp.zeros(len(views), jnp.float32)
    opt_state = opt.init(z)
    losses = []
    for batch in train:
        z, opt_state, loss = step(z, opt_state, {k: jnp.asarray(v) for k, v in batch.items()})
        losses.append(float(loss))
    weights = np.asarray(jax.nn.softmax(z), np.float64)
    weights = weights / weights.sum()
    uniform = jnp.full(len(views), 1.0 / len(views), jnp.float32)
    report = {"weights": weights.round(6).tolist(), "steps": steps, "learning_rate": learning_rate,
              "train_loss_first": round(losses[0], 6), "train_loss_last": round(losses[-1], 6),
              "heldout_batches": len(held),
              "heldout_loss_uniform": round(float(held_loss(uniform)), 6),
              "heldout_loss_fitted": round(float(held_loss(jnp.asarray(weights, jnp.float32))), 6)}
    return weights, report
