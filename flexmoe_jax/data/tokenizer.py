"""The anchor's tokenizer: SentencePiece BPE trained on the public training split only (ids pad 0,
eos 1, unk 2, no bos), its ``seqio`` vocabulary, token counts, and tokenizer-independent bits per byte.
Settings and why: docs/data.md ("Tokenizer and bits per byte").
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from flexmoe_jax.errors import UserError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train(texts: Iterable[str], out_path: str | os.PathLike, vocab_size: int, seed: int = 0,
          max_sentences: int = 2_000_000) -> Path:
    """Train the SentencePiece model on ``texts`` (documents; trained line by line); written atomically."""
    import sentencepiece as spm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed + 1)
    lines = (line for t in texts for line in t.split("\n") if line.strip())
    buf = io.BytesIO()
    # Identity normalization except "\r" -> "\n" (documents never contain "\r" after normalization;
    # a non-empty rule also keeps TF's SentencePiece op from logging on every load).
    with tempfile.TemporaryDirectory() as tmpdir:
        rule = Path(tmpdir) / "rule.tsv"
        rule.write_text("D\tA\n")
        try:
            _train(spm, lines, buf, vocab_size, rule, max_sentences)
        except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
            raise UserError(f"SentencePiece training failed (vocab_size={vocab_size}): "
                            f"{str(e).splitlines()[-1][-200:]}") from None
    # The model records the rule file's (temporary) path: drop it so the same inputs give the same bytes.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    proto.normalizer_spec.ClearField("normalization_rule_tsv")
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    os.replace(tmp, out_path)
    return out_path


def _train(spm, lines, buf, vocab_size, rule, max_sentences):
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, normalization_rule_tsv=str(rule),
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, max_sentence_length=16384,
        num_threads=max(1, min(4, os.cpu_count() or 1)), minloglevel=2)


def processor(path: str | os.PathLike):
    """A ``sentencepiece.SentencePieceProcessor`` (no TensorFlow) for the model at ``path``."""
    import sentencepiece as spm

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: run `flexmoe data build` first")
    return spm.SentencePieceProcessor(model_file=str(path))


def seqio_vocabulary(path: str | os.PathLike):
    """The ``seqio.SentencePieceVocabulary`` the tasks use (imports TensorFlow)."""
    from flexmoe_jax.data.tfds_io import quiet_tf

    quiet_tf()
    import seqio

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: run `flexmoe data build` first")
    return seqio.SentencePieceVocabulary(str(path), extra_ids=0)


def count_tokens(sp, texts: Sequence[str], add_eos: bool = True) -> list[int]:
    """Tokens per document as the tasks produce them (``+1`` for the EOS each document ends with)."""
    if not texts:
        return []
    ids = sp.encode(list(texts), num_threads=max(1, min(4, os.cpu_count() or 1)))
    return [len(x) + int(add_eos) for x in ids]


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Summed negative log-likelihood (nats) over all tokens of some text -> bits per UTF-8 byte."""
    if n_bytes <= 0:
        raise UserError("bits_per_byte needs a positive byte count")
    return float(nll_nats) / (math.log(2) * n_bytes)

