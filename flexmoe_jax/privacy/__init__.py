"""Training-data extraction check (the FlexOlmo paper's privacy test), for owners' experts and merged models.

Given a document's first ``prefix_len`` tokens, does sampling reproduce its next ``suffix_len`` within
normalized token-level Levenshtein similarity ``threshold``? Checked on trained-on and held-out texts
alike, so memorization shows as ``train >> test``. Definition and rationale: docs/privacy.md.

- :func:`run`: every model on every domain (``flexmoe privacy``); :func:`extraction_check`: one model.
- :func:`load_documents`: tokenized documents of a domain's split.
- :func:`markdown`, :func:`write_json`: the report.
"""

from flexmoe_jax.privacy.check import (
    BOS_ID,
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_DOCS,
    DEFAULT_PREFIX_LEN,
    DEFAULT_SAMPLES,
    DEFAULT_SUFFIX_LEN,
    DEFAULT_THRESHOLD,
    SPLITS,
    extraction_check,
    run,
)
from flexmoe_jax.privacy.report import markdown, write_json
from flexmoe_jax.privacy.similarity import edit_distance, normalized_similarity
from flexmoe_jax.privacy.texts import load_documents

__all__ = ["BOS_ID", "DEFAULT_BATCH_SIZE", "DEFAULT_NUM_DOCS", "DEFAULT_PREFIX_LEN", "DEFAULT_SAMPLES",
           "DEFAULT_SUFFIX_LEN", "DEFAULT_THRESHOLD", "SPLITS", "edit_distance", "extraction_check",
           "load_documents", "markdown", "normalized_similarity", "run", "write_json"]
