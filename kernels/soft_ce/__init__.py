"""Soft cross-entropy kernel (Triton) with PyTorch and JAX bindings; see api.py."""

from .api import SoftCEConfig, jax_soft_ce, torch_soft_ce

__all__ = ["SoftCEConfig", "jax_soft_ce", "torch_soft_ce"]
