"""jax's private cuDNN fused-attention bindings (`jax._src.cudnn`, jax 0.10-0.11), behind one module.

They do two things the public `jax.nn.dot_product_attention` cannot: run the backward from a given
(output, LSE), the merged ones of `split_prefix_attention`, and return the residual LSE in fp32 (the public
function rounds it to q's dtype, bf16, before the masked layout merges attention parts with it).
tests/test_cudnn_private.py fails when jax changes the primitive's operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as _fa


def _mask_args(q, kv_len, causal):
    """(mask kwargs, (query lengths, key lengths)) of one part: causal over a square block, or the first
    kv_len[row] keys for every query."""
    if causal:
        return dict(mask_type=_fa.MaskType.CAUSAL), (None, None)
    q_len = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return dict(mask_type=_fa.MaskType.PADDING), (q_len, kv_len.astype(jnp.int32))


def cudnn_attention(q, k, v, mask, key_count, causal: bool, return_residual: bool = False):
    """jax.nn.dot_product_attention(..., implementation="cudnn") on the same kernel, through the private binding:
    q [b, t, heads, d] against k/v [b, s, kv, d] under `mask` (bool, broadcastable to [b, 1, t, s], or None),
    the first key_count[row] keys ([b] or None) and `causal`. With return_residual: (out, lse [b, t, heads]
    fp32). Differentiable (the binding's own VJP, which drops the LSE's cotangent as the public one does)."""
    if key_count is None:
        mask_type, q_len = (_fa.MaskType.CAUSAL if causal else _fa.MaskType.NO_MASK), None
    else:
        mask_type = _fa.MaskType.PADDING_CAUSAL if causal else _fa.MaskType.PADDING
        q_len, key_count = jnp.full((q.shape[0],), q.shape[1], jnp.int32), key_count.astype(jnp.int32)
    out = _fa.dot_product_attention(q, k, v, mask=mask, q_seqlen=q_len, kv_seqlen=key_count,
                                    scale=float(q.shape[-1]) ** -0.5, mask_type=mask_type,
                                    return_residual=return_residual)
    if not return_residual:
        return out
    out, stats = out
    return out, jnp.swapaxes(stats, 1, 2)  # cuDNN's [b, heads, t] fp32


def cudnn_part(q, k, v, kv_len, causal):
    """(out, lse [b, t, heads] fp32) of q [b, t, heads, d] against k/v [b, s, kv, d] on cuDNN."""
    kw, (q_len, kv) = _mask_args(q, kv_len, causal)
    out, stats = _fa.dot_product_attention(q, k, v, q_seqlen=q_len, kv_seqlen=kv, scale=float(q.shape[-1]) ** -0.5,
                                           return_residual=True, **kw)
    return out, jnp.swapaxes(stats, 1, 2)  # cuDNN's [b, heads, t] fp32


def cudnn_part_dq(q, k, v, kv_len, causal, out, lse, g) -> jax.Array:
    """dq (fp32) of one part from the merged (out, lse) and the merged output's cotangent g: cuDNN's
    backward primitive, bound directly."""
    kw, (q_len, kv) = _mask_args(q, kv_len, causal)
    unused = jnp.zeros(0, q.dtype)
    grads = _fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, unused if q_len is None else q_len, unused if kv is None else kv, unused, unused, unused,
        unused, jnp.swapaxes(lse, 1, 2).astype(jnp.float32), out.astype(q.dtype), g.astype(q.dtype),
        scale=float(q.shape[-1]) ** -0.5, seed=42, dropout_rate=0.0, variadic_args=(False, False),
        layout=_fa.AttentionLayout.BTNH.value, sliding_window_length=None, **kw)
    return grads[0].astype(jnp.float32)
