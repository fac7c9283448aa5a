"""Test session setup: 8 simulated CPU devices, set before jax is first imported."""

import os

# Tiny test models: compile time dominates, so trade CPU code quality for compile speed.
# These flags change code generation only, never how a program is split across devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
