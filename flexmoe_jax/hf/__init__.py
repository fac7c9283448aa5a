"""HF transformers checkpoints in and out: FlexOlmoForCausalLM and Olmo2ForCausalLM, with numpy and safetensors only.

- :mod:`~flexmoe_jax.hf.config_map`: config.json <-> ModelConfig.
- :mod:`~flexmoe_jax.hf.tensor_map`: HF state dicts <-> our params.
- :mod:`~flexmoe_jax.hf.files`: model directories on disk (:func:`from_hf`, :func:`to_hf`).

Importing or exporting never needs torch or transformers. Design notes: docs/model.md (HF interchange).
"""

from flexmoe_jax.hf.config_map import SUPPORTED, HFFormatError, config_from_hf, config_to_hf
from flexmoe_jax.hf.files import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, from_hf, parse_size, to_hf
from flexmoe_jax.hf.tensor_map import hf_state_to_params, params_to_hf_state

__all__ = ["CONFIG_NAME", "INDEX_NAME", "SUPPORTED", "WEIGHTS_NAME", "HFFormatError", "config_from_hf",
           "config_to_hf", "from_hf", "hf_state_to_params", "params_to_hf_state", "parse_size", "to_hf"]
