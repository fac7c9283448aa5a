"""flexmoe_jax: FlexOlmo-style mixture-of-experts language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="flexmoe_jax",
    version="0.1.0",
    description="FlexOlmo-style MoE in JAX/Flax: independently trained experts, merged, opt-in/opt-out",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["flexmoe_jax", "flexmoe_jax.*"]),
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "gin-config==0.5.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tqdm>=4.66",
        # data: FlexMix-mini through tensorflow-datasets and seqio (TensorFlow is imported lazily)
        "tensorflow==2.21.0",
        "tensorflow-datasets==4.9.10",
        "tensorflow-text==2.21.1",
        "seqio==0.0.20",
        "sentencepiece==0.2.3",
        "importlib_resources==7.1.0",
        # metrics: TensorBoard event files through clu
        "clu==0.0.12",
        "tensorboard==2.21.0",
    ],
    extras_require={
        "test": ["pytest>=8"],
        # The numerical oracle: HF transformers' FlexOlmoForCausalLM on the torch CPU build.
        "hf": ["torch==2.13.0", "transformers==5.23.0"],
    },
    entry_points={"console_scripts": ["flexmoe=flexmoe_jax.cli:main"]},
)
