"""Evaluation, one concept per module: what is scored (:mod:`.sample`), by what (:mod:`.scorers`,
:mod:`.ensembles`, :mod:`.models`), which measurements (:mod:`.perplexity`, :mod:`.multiple_choice`,
:mod:`.expert_use`), how sure we are (:mod:`.bootstrap`, :mod:`.compare`) and how it is reported
(:mod:`.report`). :mod:`flexmoe_jax.eval` gathers the public names in one namespace.
"""
