"""The gin files, shipped inside the installed package as ``flexmoe_jax.gin_configs`` (see setup.py)."""
