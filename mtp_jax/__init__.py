"""mtp-jax: multi-token-prediction adapters for frozen Llama/Qwen3 models, in JAX."""

__version__ = "0.1.0"
