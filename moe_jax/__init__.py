"""moe_jax: Switch Transformer / GShard Mixture-of-Experts models in JAX and Flax."""

__version__ = "0.1.0"
