"""dq-only attention backward from a given (merged) output and LSE: one Triton source
(triton_dq.py), bound to JAX (`jax_attention_dq`, through jax_triton) and to PyTorch
(`torch_attention_dq`: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 for tests)."""

from .api import DQConfig, jax_attention_dq, torch_attention_dq

__all__ = ["DQConfig", "jax_attention_dq", "torch_attention_dq"]
