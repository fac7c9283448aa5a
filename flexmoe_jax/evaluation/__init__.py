"""Evaluation measurement: what is scored (:mod:`.sample`) and how sure we are of it (:mod:`.bootstrap`).

The scorers, soup/BTM, multiple choice and reports still live in :mod:`flexmoe_jax.eval`; new
evaluation code goes here, one concept per module.
"""
