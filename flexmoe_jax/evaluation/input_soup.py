"""The weighted soup in the paper's form: mixing weights per input, from each member's likelihood of it.

FlexOlmo's weighted-soup baseline averages the dense experts' parameters with weights that depend on
the input: ``w_m = softmax_m(-NLL_m(input) / T)``, ``NLL_m`` member m's mean negative log-likelihood
of the input. :class:`InputSoupScorer` does that per document piece (segment) of a packed batch, with
the same input the paper-form BTM weighs by (:func:`flexmoe_jax.evaluation.ensembles.input_context_mask`:
a multiple-choice question, else the piece's first ``context_tokens`` tokens): every later token of
the piece is scored by the soup ``sum_m w_m theta_m`` of that piece, and the tokens of the input
itself, before its weights exist, by the uniform soup (the weights' prior). Each weighted piece runs
as its own row through a forward pass whose parameters are averaged on the device per row
(``jax.vmap`` over rows of per-row parameters), so a batch costs one uniform-soup pass plus one pass
per piece that has tokens after its input.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation.ensembles import dense_view, input_context_mask, soup
from flexmoe_jax.evaluation.scorers import Batch, ModelScorer, Scorer


@functools.partial(jax.jit, static_argnames=("config",))
def _weighted_rows(config: ModelConfig, stacked, weights, inputs, targets, positions, segment_ids):
    """[R, S] log-probs of ``targets``, row r run by the soup ``sum_m weights[r, m] * stacked[m]``."""
    def one(w, x, y, pos, seg):
        params = jax.tree.map(lambda p: jnp.tensordot(w, p.astype(jnp.float32), axes=1).astype(p.dtype), stacked)
        logits, _ = model.apply(config, params, x[None], pos[None], seg[None])
        lp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        return jnp.where(seg > 0, jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0], 0.0)

    return jax.vmap(one)(weights, inputs, targets, positions, segment_ids)


def segment_weights(member_logprobs: np.ndarray, segment_ids: np.ndarray, context: np.ndarray,
                    temperature: float) -> np.ndarray:
    """[M, B, S] weights ``softmax_m(-mean NLL of the segment's context tokens / T)``, the same for every
    token of a segment (uniform where a segment has no context tokens)."""
    m, b, s = member_logprobs.shape
    out = np.full((m, b, s), 1.0 / m)
    for r in range(b):
        for sid in np.unique(segment_ids[r][segment_ids[r] > 0]):
            seg = segment_ids[r] == sid
            ctx = seg & context[r]
            if not ctx.any():
                continue
            logits = member_logprobs[:, r, ctx].astype(np.float64).mean(-1) / temperature
            w = np.exp(logits - logits.max())
            out[:, r, seg] = (w / w.sum())[:, None]
    return out


class InputSoupScorer(Scorer):
    """The per-input weighted soup (module docstring) of ``models`` (dense models or owners' 2-expert
    models, viewed dense as in :func:`soup`), weighed by ``members`` (scorers of the same models:
    pass the cached ones other rows score with, and the weights cost no forward pass)."""

    def __init__(self, models: Sequence[tuple[ModelConfig, model.Params]], members: Sequence[Scorer], *,
                 temperature: float = 0.1, context_tokens: int = 32, rows_per_call: int = 16,
                 name: str = "soup_input"):
        if len(models) != len(members) or not models:
            raise UserError(f"the per-input soup needs one scorer per model; got {len(models)} models and "
                            f"{len(members)} scorers")
        if not temperature > 0:
            raise UserError(f"the per-input soup's temperature must be positive, got {temperature}")
        base, uniform = soup(models)  # checks every member has the anchor's architecture
        views = [dense_view(c, p)[1] for c, p in models]
        self.config, self.name = base, name
        self.stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *views)
        self.uniform = ModelScorer(base, uniform, name=f"{name}[uniform]")
        self.members, self.temperature, self.context_tokens = list(members), float(temperature), int(context_tokens)
        self.rows_per_call = int(rows_per_call)
        self.vocab_size, self.max_seq_len = base.vocab_size, base.max_seq_len

    def logprobs(self, batch: Batch) -> jax.Array:
        segs = np.asarray(batch["decoder_segment_ids"])
        context = np.asarray(input_context_mask(batch, self.context_tokens))
        out = np.array(self.uniform.token_logprobs(batch), np.float32)  # the input's own tokens: uniform soup
        lps = np.stack([m.token_logprobs(batch) for m in self.members])
        weights = segment_weights(lps, segs, context, self.temperature)
        rows = []
        for r in range(segs.shape[0]):
            for sid in np.unique(segs[r][segs[r] > 0]):
                at = np.nonzero(segs[r] == sid)[0]
                later = at[~context[r, at]]
                if later.size and context[r, at].any():
                    rows.append((r, at, weights[:, r, at[0]]))
        s = segs.shape[1]
        for lo in range(0, len(rows), self.rows_per_call):
            chunk = rows[lo: lo + self.rows_per_call]
            n = self.rows_per_call  # fixed shapes: one compiled program
            feats = {k: np.zeros((n, s), np.int32) for k in ("x", "y", "pos", "seg")}
            w = np.full((n, len(self.members)), 1.0 / len(self.members), np.float32)
            for i, (r, at, wr) in enumerate(chunk):
                k = len(at)
                feats["x"][i, :k] = batch["decoder_input_tokens"][r, at]
                feats["y"][i, :k] = batch["decoder_target_tokens"][r, at]
                feats["pos"][i, :k] = batch["decoder_positions"][r, at]
                feats["seg"][i, :k] = 1
                w[i] = wr
            got = np.asarray(_weighted_rows(self.config, self.stacked, jnp.asarray(w), *(jnp.asarray(feats[k])
                                            for k in ("x", "y", "pos", "seg"))))
            for i, (r, at, _) in enumerate(chunk):
                keep = ~context[r, at]
                out[r, at[keep]] = got[i, :len(at)][keep]
        return jnp.asarray(out)
