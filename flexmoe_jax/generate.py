"""Text generation with a KV cache, and per-expert attribution of every answer.

:func:`generate` left-pads prompts into one batch, prefills once and decodes inside one jitted
``while_loop`` (greedy at ``temperature == 0``, else nucleus sampling with ``top_p``; a seed
reproduces a generation). For an MoE model each prompt's record says which experts served its
generated tokens (``experts``: share of gate weight, summing to 1 over the active experts;
``counts``: top-k choices; opted-out experts under ``excluded``). ``routing="density"`` decodes every
sub-model of a merged model at once ({public} and each {public, d}, as route masks of the one set of
weights: one cache per member) and samples each token from the member whose likelihood of the prompt
and the tokens generated so far is highest, as :func:`flexmoe_jax.eval.density_scorer` scores it.
Details: docs/generation.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model, routing as routing_lib, selection
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """One token per row of ``logits`` [B, V]: temperature + nucleus (top-p) sampling."""
    logits = logits.astype(jnp.float32) / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = before < top_p  # always true for the first (most likely) token
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _pick(logits, key, temperature, top_p, greedy: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, key, temperature, top_p)


def _record(t, tok, out, done, gsum, cnt, ngen, g, gc, eos_id):
    """One decoding step's bookkeeping: rows already done emit padding and count nothing; a row that
    emits ``eos_id`` is done. Returns (token, out, done, gate sums, counts, generated, live)."""
    live = ~done
    tok = jnp.where(live, tok, 0)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
    gsum = gsum + jnp.where(live[:, None], g, 0.0)
    cnt = cnt + jnp.where(live[:, None], gc, 0)
    return tok, out, done | (live & (tok == eos_id)), gsum, cnt, ngen + live, live


@functools.partial(jax.jit, static_argnames=("config", "keep", "max_new_tokens", "greedy", "use_cache", "public"))
def _generate_jit(config: ModelConfig, params, tokens, lengths, key, temperature, top_p, eos_id, table=None, *,
                  keep, max_new_tokens: int, greedy: bool, use_cache: bool, public: int = 0):
    """tokens [B, P] left-padded, lengths [B] -> (out [B, N], n_generated [B], gate_sum [B, E], counts [B, E]).
    ``table``: domain routing's models (:class:`flexmoe_jax.routing.Tables`), public slot ``public``."""
    params = selection.take(params, keep)
    b, p = tokens.shape
    n = max_new_tokens
    m = p + n - 1  # slots ever fed to the model: the prompt and every generated token but the last
    e = config.num_experts
    slots = jnp.arange(m, dtype=jnp.int32)
    pad = (p - lengths)[:, None]
    seg_all = (slots[None] >= pad).astype(jnp.int32)
    pos_all = jnp.maximum(slots[None] - pad, 0)

    def gates_of(aux, at):  # routing of the position(s) that produced a token -> [B, E] summed over layers
        if not e:
            return jnp.zeros((b, 0), jnp.float32), jnp.zeros((b, 0), jnp.int32)
        g = jax.lax.dynamic_index_in_dim(aux["gates"], at, axis=2, keepdims=False).astype(jnp.float32)
        return jnp.sum(g, axis=0), jnp.sum(g > 0, axis=0).astype(jnp.int32)

    def domain_bias(dom_sum):  # [B, E] summed log-probs so far -> [B, 1, E]
        return None if table is None else routing_lib.allowed_bias(jnp.argmax(dom_sum, -1), e, public)[:, None]

    dom0 = jnp.zeros((b, e), jnp.float32)
    if table is not None:
        prev0 = jnp.where(pos_all[:, :p] > 0, jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1], 0)
        dom0 = jnp.sum(jnp.where(((tokens > 0) & (seg_all[:, :p] > 0))[..., None],
                                 routing_lib.token_ll(table, prev0, tokens), 0.0), axis=1)
    if use_cache:
        cache = model.init_cache(config, b, m)
        bias = None if table is None else routing_lib.route_bias(table, public, tokens, pos_all[:, :p], seg_all[:, :p])
        logits, aux, cache = model.decode_apply(config, params, cache, tokens, pos_all[:, :p], seg_all[:, :p],
                                                route_bias=bias)
        state = cache
    else:
        buf = jnp.zeros((b, m), jnp.int32).at[:, :p].set(tokens)
        bias = None if table is None else routing_lib.route_bias(table, public, buf, pos_all, seg_all)
        logits, aux = model.apply(config, params, buf, pos_all, seg_all, route_bias=bias)
        state = buf
    last = logits[:, p - 1]
    g0, c0 = gates_of(aux, p - 1)
    tok0 = _pick(last, jax.random.fold_in(key, 0), temperature, top_p, greedy)
    out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(tok0)
    carry = (jnp.int32(1), state, tok0, out, tok0 == eos_id, g0, c0, jnp.ones((b,), jnp.int32), dom0, tokens[:, -1])

    def cond(c):
        t, _, _, _, done, *_ = c
        return (t < n) & ~jnp.all(done)

    def body(c):
        t, state, prev, out, done, gsum, cnt, ngen, dom, before = c  # before: the token ahead of prev
        slot = p + t - 1  # where the previous token goes
        if table is not None:
            dom = dom + jnp.where((prev > 0)[:, None], routing_lib.token_ll(table, before, prev), 0.0)
        if use_cache:
            pos = jax.lax.dynamic_slice_in_dim(pos_all, slot, 1, axis=1)
            logits, aux, state = model.decode_apply(config, params, state, prev[:, None], pos,
                                                    jnp.ones((b, 1), jnp.int32), route_bias=domain_bias(dom))
            logits, at = logits[:, 0], 0
        else:
            state = jax.lax.dynamic_update_slice_in_dim(state, prev[:, None], slot, axis=1)
            bias = None if table is None else routing_lib.route_bias(table, public, state, pos_all, seg_all)
            logits, aux = model.apply(config, params, state, pos_all, seg_all, route_bias=bias)
            logits, at = jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False), slot
        g, gc = gates_of(aux, at)
        tok = _pick(logits, jax.random.fold_in(key, t), temperature, top_p, greedy)
        tok, out, done, gsum, cnt, ngen, live = _record(t, tok, out, done, gsum, cnt, ngen, g, gc, eos_id)
        return (t + 1, state, tok, out, done, gsum, cnt, ngen, dom, prev)

    _, _, _, out, _, gsum, cnt, ngen, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, ngen, gsum, cnt


@functools.partial(jax.jit, static_argnames=("config", "keep", "max_new_tokens", "greedy", "public"))
def _generate_density_jit(config: ModelConfig, params, tokens, lengths, key, temperature, top_p, eos_id, *,
                          keep, max_new_tokens: int, greedy: bool, public: int):
    """Density routing's generation (module docstring); returns as :func:`_generate_jit`.

    Member 0 is the public expert alone, member k >= 1 the public expert with the k-th other one, each
    a route mask (:func:`flexmoe_jax.routing.allowed_bias`) on the same params: exactly that sub-model.
    A member's context is its summed log-probability of the prompt's tokens after the first and of
    every generated token; each token is drawn from the best member's distribution (the uniform mix
    of tied members, e.g. all of them before any context), and its attribution is that member's gates.
    """
    params = selection.take(params, keep)
    b, p = tokens.shape
    n = max_new_tokens
    e = config.num_experts
    slots = jnp.arange(p + n - 1, dtype=jnp.int32)
    pad = (p - lengths)[:, None]
    seg_all = (slots[None] >= pad).astype(jnp.int32)
    pos_all = jnp.maximum(slots[None] - pad, 0)
    own = jnp.asarray([public] + [i for i in range(e) if i != public], jnp.int32)
    biases = routing_lib.allowed_bias(own, e, public)  # [M, E]

    def members(caches, toks, pos, seg):  # every member's cached forward -> logits [M, B, S, V], aux, caches
        def one(cache, bias):
            return model.decode_apply(config, params, cache, toks, pos, seg,
                                      route_bias=jnp.broadcast_to(bias, (*toks.shape, e)))
        return jax.vmap(one)(caches, biases)

    def choose(context, logits, gates):  # [M, B], [M, B, V], [M, L, B, E] -> (mixed log-probs [B, V], g, count)
        best = jnp.max(context, axis=0, keepdims=True)
        w = jax.nn.softmax(jnp.where(context >= best, 0.0, -jnp.inf), axis=0)  # [M, B]: uniform over the tied best
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        mixed = jax.nn.logsumexp(jnp.log(w)[..., None] + lp, axis=0)
        per_layer = jnp.einsum("mb,mlbe->lbe", w, gates.astype(jnp.float32))
        return mixed, lp, jnp.sum(per_layer, axis=0), jnp.sum(per_layer > 0, axis=0).astype(jnp.int32)

    def take(lp, tok):  # [M, B, V], [B] -> [M, B]
        return jnp.take_along_axis(lp, jnp.broadcast_to(tok[None, :, None], (lp.shape[0], b, 1)), axis=-1)[..., 0]

    empty = model.init_cache(config, b, p + n - 1)
    caches = jax.tree.map(lambda x: jnp.broadcast_to(x, (own.shape[0], *x.shape)), empty)
    logits, aux, caches = members(caches, tokens, pos_all[:, :p], seg_all[:, :p])
    prompt_lp = jax.nn.log_softmax(logits[:, :, :-1].astype(jnp.float32), axis=-1)
    prompt_lp = jnp.take_along_axis(prompt_lp, jnp.broadcast_to(tokens[None, :, 1:, None], (*prompt_lp.shape[:3], 1)),
                                    axis=-1)[..., 0]
    context = jnp.sum(jnp.where((seg_all[:, :p - 1] > 0)[None], prompt_lp, 0.0), axis=-1)  # [M, B]
    mixed, lp, g0, c0 = choose(context, logits[:, :, -1], aux["gates"][:, :, :, -1])
    tok0 = _pick(mixed, jax.random.fold_in(key, 0), temperature, top_p, greedy)
    out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(tok0)
    carry = (jnp.int32(1), caches, tok0, out, tok0 == eos_id, g0, c0, jnp.ones((b,), jnp.int32),
             context + take(lp, tok0))

    def cond(c):
        t, _, _, _, done, *_ = c
        return (t < n) & ~jnp.all(done)

    def body(c):
        t, caches, prev, out, done, gsum, cnt, ngen, context = c
        pos = jax.lax.dynamic_slice_in_dim(pos_all, p + t - 1, 1, axis=1)
        logits, aux, caches = members(caches, prev[:, None], pos, jnp.ones((b, 1), jnp.int32))
        mixed, lp, g, gc = choose(context, logits[:, :, 0], aux["gates"][:, :, :, 0])
        tok = _pick(mixed, jax.random.fold_in(key, t), temperature, top_p, greedy)
        tok, out, done, gsum, cnt, ngen, live = _record(t, tok, out, done, gsum, cnt, ngen, g, gc, eos_id)
        context = context + jnp.where(live[None], take(lp, tok), 0.0)
        return (t + 1, caches, tok, out, done, gsum, cnt, ngen, context)

    _, _, _, out, _, gsum, cnt, ngen, _ = jax.lax.while_loop(cond, body, carry)
    return out, ngen, gsum, cnt


def _check_prompts(config: ModelConfig, prompts: Any) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise UserError("prompts must be a list of token-id lists (use generate_text for strings), "
                        f"got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise UserError("no prompts given: pass at least one list of token ids")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise UserError(f"prompt {i} is a string; generate takes token ids (use generate_text for strings)")
        arr = np.asarray(p)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise UserError(f"prompt {i} must be a 1-D list of integer token ids, "
                            f"got shape {arr.shape} dtype {arr.dtype}")
        if arr.size == 0:
            raise UserError(f"prompt {i} is empty: give at least one token")
        if arr.min() < 0 or arr.max() >= config.vocab_size:
            raise UserError(f"prompt {i} has token ids in [{arr.min()}, {arr.max()}], outside this model's "
                            f"vocab [0, {config.vocab_size}); was it encoded with another tokenizer?")
        out.append(arr.astype(np.int32))
    return out


def generate(config: ModelConfig, params: model.Params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             active_experts: Sequence[str | int] | None = None, top_k: int | None = None,
             eos_id: int | None = 1, use_cache: bool = True, routing: str | None = None,
             routing_stats: Mapping | None = None, score: Mapping | None = None) -> list[dict]:
    """Continue each token prompt; one ``{"tokens": [...], "attribution": {...}}`` per prompt.

    ``tokens`` are the generated ids, ending with ``eos_id`` if the row produced
    it (nothing after it); at most ``max_new_tokens``. ``eos_id=None`` never
    stops early. ``active_experts`` / ``top_k`` opt experts out exactly as
    :func:`model.forward` does. See the module docstring for sampling and the
    attribution record. ``routing`` / ``routing_stats`` / ``score``: the routing mode and router
    scores (:func:`flexmoe_jax.routing.resolve`; default the config's own); ``routing="density"``
    decodes every sub-model of a merged model (module docstring; one forward per member and token).
    """
    rows = _check_prompts(config, prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > config.max_seq_len:
        raise UserError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                        f"{longest + max_new_tokens} exceeds the model's max_seq_len={config.max_seq_len}; "
                        "shorten the prompt or ask for fewer tokens")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    model.check_params(config, params)
    run_config, keep = selection.plan(config, include=active_experts, top_k=top_k)
    density = routing == DENSITY
    if density:
        run_config = _density_config(run_config, routing_stats, use_cache)
        router = None
        if score:
            run_config, _ = routing_lib.resolve(run_config, "top_k", score=score)
    else:
        run_config, router = routing_lib.resolve(run_config, routing, routing_stats, score=score)

    tokens = np.zeros((len(rows), longest), np.int32)  # left padding (pad id 0, segment 0)
    for i, r in enumerate(rows):
        tokens[i, longest - len(r):] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    args = (run_config, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(seed),
            jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p),
            jnp.int32(-1 if eos_id is None else eos_id))
    if density:
        out, ngen, gsum, cnt = _generate_density_jit(*args, public=run_config.names.index(routing_lib.PUBLIC),
                                                     keep=keep, max_new_tokens=int(max_new_tokens),
                                                     greedy=temperature == 0)
    else:
        out, ngen, gsum, cnt = _generate_jit(
            *args, None if router is None else router.table, public=0 if router is None else router.public,
            keep=keep, max_new_tokens=int(max_new_tokens), greedy=temperature == 0, use_cache=use_cache)
    out, ngen, gsum, cnt = (np.asarray(a) for a in jax.device_get((out, ngen, gsum, cnt)))
    excluded = [] if keep is None else [config.names[i] for i in range(config.num_experts) if i not in keep]
    return [{"tokens": [int(x) for x in out[i, :ngen[i]]],
             "attribution": _attribution(run_config, gsum[i], cnt[i], int(ngen[i]), excluded)}
            for i in range(len(rows))]


DENSITY = "density"  # routing by the sub-models' own likelihoods (module docstring)


def _density_config(config: ModelConfig, routing_stats, use_cache: bool) -> ModelConfig:
    """The config density generation runs each member with (top-k inside the member's pair)."""
    if not config.is_moe or routing_lib.PUBLIC not in config.names or config.num_experts < 2:
        raise UserError(f"density routing needs a merged model with the {routing_lib.PUBLIC!r} expert and at least "
                        f"one owner active; this one has experts {list(config.names) if config.is_moe else 'none'}")
    if routing_stats is not None:
        raise UserError("density routing uses no routing stats (nothing but the weights): drop them")
    if not use_cache:
        raise UserError("density generation decodes with the KV cache only (use_cache=True)")
    return config.replace(routing="top_k")


def _attribution(config: ModelConfig, gate_sum: np.ndarray, counts: np.ndarray, n_tokens: int,
                 excluded: list[str]) -> dict:
    if not config.is_moe:
        return {"dense": True, "experts": {}, "counts": {}, "tokens": n_tokens, "layers": config.n_layers}
    total = float(np.sum(gate_sum, dtype=np.float64))
    shares = gate_sum.astype(np.float64) / total if total > 0 else np.full(len(gate_sum), 1.0 / len(gate_sum))
    return {"dense": False,
            "experts": {name: float(s) for name, s in zip(config.names, shares)},
            "counts": {name: int(c) for name, c in zip(config.names, counts)},
            "tokens": n_tokens, "layers": config.n_layers, "top_k": config.top_k, "excluded": excluded}


def generate_text(config: ModelConfig, params: model.Params, prompts: Sequence[str], vocab, **kwargs) -> list[dict]:
    """Strings in, strings out: ``[{"prompt", "completion", "tokens", "attribution"}]`` per prompt.

    ``vocab`` is a seqio vocabulary (``flexmoe_jax.data.vocabulary(data_dir)``)
    or the plain SentencePiece processor of the same model
    (``flexmoe_jax.data.sentencepiece(data_dir)``, no TensorFlow import): both give
    the same ids. Its eos id stops generation unless ``eos_id`` is passed.
    ``completion`` is the decoded text of the generated tokens without the eos;
    ``kwargs`` go to :func:`generate`.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise UserError("no prompts given")
    encoded = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise UserError(f"prompt {i} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise UserError(f"prompt {i} is empty: give some text to continue")
        ids = [int(x) for x in vocab.encode(text)]
        if not ids:
            raise UserError(f"prompt {i} ({text!r}) encodes to no tokens")
        encoded.append(ids)
    kwargs.setdefault("eos_id", vocab.eos_id() if callable(vocab.eos_id) else vocab.eos_id)
    eos = kwargs["eos_id"]
    results = generate(config, params, encoded, **kwargs)
    out = []
    for text, r in zip(prompts, results):
        ids = r["tokens"][:-1] if eos is not None and r["tokens"] and r["tokens"][-1] == eos else r["tokens"]
        out.append({"prompt": text, "completion": vocab.decode(ids), "tokens": r["tokens"],
                    "attribution": r["attribution"]})
    return out
