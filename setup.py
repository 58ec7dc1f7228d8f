"""moe_jax: sparse Mixture-of-Experts Transformers (Switch, GShard) in JAX/Flax."""
import pathlib

import setuptools

_ROOT = pathlib.Path(__file__).parent
# Gin configs ship inside the package (moe_jax/gin) so they are found after a non-editable install.
_GIN = [str(p.relative_to(_ROOT / "gin")) for p in (_ROOT / "gin").rglob("*.gin")]

setuptools.setup(
    name="moe_jax",
    version="0.1.0",
    description="Switch Transformer / GShard Mixture-of-Experts for JAX and Flax",
    long_description=(_ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["moe_jax", "moe_jax.*"]) + ["moe_jax.gin"],
    package_dir={"moe_jax.gin": "gin"},
    package_data={"moe_jax.gin": _GIN},
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "gin-config>=0.5.0",
        "seqio>=0.0.19",
        "sentencepiece>=0.2.0",
        "clu>=0.0.12",
        "tensorboard>=2.16",
        "tensorstore>=0.1.20",  # t5x's legacy checkpoint format (checkpoints/t5x_checkpoints.py)
        "tqdm>=4.66",
        "numpy>=1.26",
        "absl-py>=2.0",
        "matplotlib>=3.8",
        "rich>=13",  # jax.debug.visualize_array_sharding (notebooks)
    ],
    extras_require={
        # t5x's own trainer on moe_jax models (moe_jax/t5x_bridge.py). t5x, airio and jestimator
        # are not on PyPI: install them from source with --no-deps (README, "Train with t5x");
        # these are the PyPI packages they import. aqtp is flaxformer's (the reference model).
        "t5x": ["cached_property", "chex", "fiddle>=0.2.5", "grain", "jaxtyping",
                "aqtp==0.9.0"],
        # HF transformers Switch/T5 import and export (scripts/convert_hf_switch.py).
        "hf": ["safetensors>=0.4", "transformers>=4.45", "torch==2.13.0"],
        "test": [
            "aqtp==0.9.0",  # flaxformer (the parity tests' reference) imports it
            # t5x (the bridge and checkpoint tests' reference), as the "t5x" extra
            "cached_property", "chex", "fiddle>=0.2.5", "grain", "jaxtyping",
            "safetensors>=0.4",
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "torch==2.13.0",
            "transformers>=4.45",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
)
