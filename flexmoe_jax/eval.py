"""The evaluation API in one namespace: ``from flexmoe_jax import eval as ev; ev.main_eval(...)``.

Each concept lives in its own module of :mod:`flexmoe_jax.evaluation`; this module only gathers
their public names:

- :mod:`~flexmoe_jax.evaluation.tasks`: domain names <-> task names, the shared defaults
- :mod:`~flexmoe_jax.evaluation.scorers`: the :class:`Scorer` interface, :class:`ModelScorer`, :class:`CachedScorer`
- :mod:`~flexmoe_jax.evaluation.models`: loading a checkpoint / merged model / run directory
- :mod:`~flexmoe_jax.evaluation.ensembles`: model soup and BTM
- :mod:`~flexmoe_jax.evaluation.multiple_choice`: the held-out multiple-choice suite
- :mod:`~flexmoe_jax.evaluation.perplexity`: bits per byte with bootstrap intervals (:func:`evaluate`)
- :mod:`~flexmoe_jax.evaluation.expert_use`: which experts each domain's tokens reach (:func:`routing`)
- :mod:`~flexmoe_jax.evaluation.report`: tables, plots, JSON and :func:`main_eval` (``flexmoe eval``)
- :mod:`~flexmoe_jax.data.eval_sample`, :mod:`~flexmoe_jax.evaluation.bootstrap`,
  :mod:`~flexmoe_jax.evaluation.compare`: what is scored, and how sure we are
"""

from __future__ import annotations

from flexmoe_jax.evaluation.ensembles import (  # noqa: F401
    CONTEXTS,
    PROMPT_MASK,
    BTMScorer,
    btm_combine,
    btm_scorer,
    dense_view,
    density_scorer,
    soup,
    soup_scorer,
)
from flexmoe_jax.evaluation.expert_use import (  # noqa: F401
    routing,
)
from flexmoe_jax.evaluation.models import (  # noqa: F401
    checkpoint_routing_stats,
    default_name,
    default_routing,
    load_model,
)
from flexmoe_jax.evaluation.multiple_choice import (  # noqa: F401
    DEFAULT_MC_CHOICES,
    DEFAULT_MC_ITEMS,
    MC_LENGTH_POOL,
    MC_MAX_CHOICE,
    MC_MAX_CONTEXT,
    MC_MIN_CHOICE,
    MC_MIN_CONTEXT,
    MODES,
    MCItem,
    _encode_pair,
    build_mc_items,
    choice_loglikelihoods,
    mc_items,
    mc_rows,
    score_mc,
    split_document,
)
from flexmoe_jax.evaluation.perplexity import (  # noqa: F401
    PER_DOC,
    REPLICATES,
    average,
    evaluate,
    perplexity,
)
from flexmoe_jax.evaluation.report import (  # noqa: F401
    _columns,
    docs_path,
    main_eval,
    plot,
    results_table,
    strip_per_doc,
)
from flexmoe_jax.evaluation.scorers import (  # noqa: F401
    Batch,
    CachedScorer,
    ModelScorer,
    Scorer,
)
from flexmoe_jax.evaluation.tasks import (  # noqa: F401
    AVERAGE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEQ_LEN,
    PUBLIC,
    default_tasks,
    resolve_tasks,
    short_name,
)
