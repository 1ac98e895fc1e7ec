"""Soft cross-entropy CE(x, t) = -sum_v softmax(t)_v * log_softmax(x)_v, per row.

The only import surface of the kernel: one Triton source (triton_soft_ce.py)
bound to PyTorch (`torch_soft_ce`) and to JAX (`jax_soft_ce`), with a pure-jnp
path for CPU. Each framework is imported only when its function is first called.

Conventions shared by every path (see NOTES.md):
- x, t: [..., V], same shape and dtype (float32, bfloat16, float16); the loss
  is float32, the gradient has the logits' dtype.
- mask [...] (nonzero = keep): masked rows give loss 0 and gradient exactly 0,
  whatever their logits hold.
- t is a constant (teacher) unless grad_t=True.
- A NaN (or +inf) in a kept row of x or t makes that row's loss and its whole
  gradient row NaN; other rows are unaffected. -inf logits are fine as long as
  each row has a finite one; a term whose teacher probability is 0 adds 0.
"""

from __future__ import annotations

from .config import SoftCEConfig


def torch_soft_ce(x, t, mask=None, reduction: str = "mean", *, grad_t: bool = False,
                  config: SoftCEConfig | None = None):
    """PyTorch op (autograd.Function). reduction: 'none' (per row), 'sum', or
    'mean' (sum over kept rows / number of kept rows, as the MTP loss)."""
    from .torch_op import soft_ce

    return soft_ce(x, t, mask, reduction=reduction, grad_t=grad_t, config=config)


def jax_soft_ce(x, t, mask=None, impl: str = "auto", *, grad_t: bool = False,
                config: SoftCEConfig | None = None):
    """JAX op (custom_vjp), per-row loss of shape x.shape[:-1].

    impl: 'triton' (jax_triton kernels, GPU), 'jnp' (chunked pure jnp), or
    'auto' (triton on GPU when jax_triton imports, else jnp). Works under jit,
    vmap and shard_map."""
    from .jax_op import soft_ce

    return soft_ce(x, t, mask, impl, grad_t=grad_t, config=config)


__all__ = ["SoftCEConfig", "jax_soft_ce", "torch_soft_ce"]
