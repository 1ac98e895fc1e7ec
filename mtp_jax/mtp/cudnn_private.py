"""jax's private cuDNN fused-attention bindings (`jax._src.cudnn`, jax 0.10-0.11), behind one module.

They do three things the public `jax.nn.dot_product_attention` cannot: run the backward from a given
(output, LSE), the merged ones of `split_prefix_attention`; sequence packing (runs of queries and keys
per example, `packed_split_attention` and the packed regular stream); and return the residual LSE in
fp32 (the public function rounds it to q's dtype, bf16, before the masked layout merges attention
parts with it). tests/test_cudnn_private.py fails when jax changes the primitive's operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as _fa


def _mask_args(q, key_count, causal: bool):
    """(mask type, query lengths, key lengths) of a call over the first key_count[row] keys ([b], or None:
    all of them), causal or not."""
    if key_count is None:
        return (_fa.MaskType.CAUSAL if causal else _fa.MaskType.NO_MASK), None, None
    return ((_fa.MaskType.PADDING_CAUSAL if causal else _fa.MaskType.PADDING),
            jnp.full((q.shape[0],), q.shape[1], jnp.int32), key_count.astype(jnp.int32))


def cudnn_attention(q, k, v, mask, key_count, causal: bool, return_residual: bool = False):
    """jax.nn.dot_product_attention(..., implementation="cudnn") on the same kernel, through the private binding:
    q [b, t, heads, d] against k/v [b, s, kv, d] under `mask` (bool, broadcastable to [b, 1, t, s], or None),
    the first key_count[row] keys ([b] or None) and `causal`. With return_residual: (out, lse [b, t, heads]
    fp32). Differentiable (the binding's own VJP, which drops the LSE's cotangent as the public one does)."""
    mask_type, q_len, key_count = _mask_args(q, key_count, causal)
    out = _fa.dot_product_attention(q, k, v, mask=mask, q_seqlen=q_len, kv_seqlen=key_count,
                                    scale=float(q.shape[-1]) ** -0.5, mask_type=mask_type,
                                    return_residual=return_residual)
    if not return_residual:
        return out
    out, stats = out
    return out, jnp.swapaxes(stats, 1, 2)  # cuDNN's [b, heads, t] fp32


def cudnn_part(q, k, v, kv_len, causal):
    """(out, lse [b, t, heads] fp32) of one split part on cuDNN: the first kv_len[row] keys, or (kv_len None)
    causal over a square block."""
    return cudnn_attention(q, k, v, None, kv_len, causal, return_residual=True)


def cudnn_part_dq(q, k, v, kv_len, causal, out, lse, g) -> jax.Array:
    """dq (fp32) of one part from the merged (out, lse) and the merged output's cotangent g: cuDNN's
    backward primitive, bound directly."""
    mask_type, q_len, kv = _mask_args(q, kv_len, causal)
    unused = jnp.zeros(0, q.dtype)
    grads = _fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, unused if q_len is None else q_len, unused if kv is None else kv, unused, unused, unused,
        unused, jnp.swapaxes(lse, 1, 2).astype(jnp.float32), out.astype(q.dtype), g.astype(q.dtype),
        scale=float(q.shape[-1]) ** -0.5, seed=42, dropout_rate=0.0, variadic_args=(False, False),
        layout=_fa.AttentionLayout.BTNH.value, sliding_window_length=None, mask_type=mask_type)
    return grads[0].astype(jnp.float32)


# Sequence packing (Hopper or later): runs of queries and keys per row, [b, runs] int32 each, -1 where unused
# (jax shifts the used runs of all rows to the front, in row-major order). The softmax stats come back as
# [b * runs, heads, t]: the g-th used run's queries at [g, :, 0 .. its length - 1].

def _packed_operands(runs):
    q_len, q_off, kv_len, kv_off, _ = runs
    end = jnp.full((q_len.shape[0], 1), -1, jnp.int32)
    return q_len, kv_len, jnp.concatenate([q_off, end], 1), jnp.concatenate([kv_off, end], 1)


def _stats_index(q_len, q_off, t: int):
    """[b, t] each: the used run index g of every query position (b * runs where none), its place in the run,
    and whether it lies in a used run."""
    b, m = q_len.shape
    used = q_len > 0
    g = (jnp.cumsum(used.reshape(-1)) - 1).reshape(b, m)
    pos = jnp.arange(t)
    inside = used[:, :, None] & (pos >= q_off[:, :, None]) & (pos < (q_off + q_len)[:, :, None])  # [b, m, t]
    has = jnp.any(inside, axis=1)
    run = jnp.argmax(inside, axis=1)
    place = pos - jnp.take_along_axis(q_off, run, 1)
    return jnp.where(has, jnp.take_along_axis(g, run, 1), b * m), jnp.where(has, place, 0), has


def _packed_mask_type(causal: bool):
    return _fa.MaskType.PADDING_CAUSAL if causal else _fa.MaskType.PADDING


def cudnn_packed_part(q, k, v, runs, causal: bool, with_lse: bool = True):
    """(out, lse [b, t, heads] fp32) of q [b, t, heads, d] against k/v [b, s, kv, d] in packed runs
    (split_attention.packed_runs: (q_len, q_offset, kv_len, kv_offset, overflow)): each run's queries see
    its keys (causal: top-left aligned). Queries outside every used run get out 0 and LSE -inf; a row whose
    runs overflowed gets NaN. `with_lse` False: the output alone (lse None)."""
    q_len, kv_len, q_off, kv_off = _packed_operands(runs)
    res = _fa.dot_product_attention(q, k, v, q_seqlen=q_len, kv_seqlen=kv_len, q_offsets=q_off, kv_offsets=kv_off,
                                    scale=float(q.shape[-1]) ** -0.5, mask_type=_packed_mask_type(causal),
                                    return_residual=with_lse)
    out, stats = res if with_lse else (res, None)
    g, place, has = _stats_index(runs[0], runs[1], q.shape[1])
    bad = runs[4][:, None, None]
    out = jnp.where(bad[..., None], jnp.nan, jnp.where(has[..., None, None], out, 0)).astype(q.dtype)
    if not with_lse:
        return out, None
    lse = stats[g, :, place]  # [b, t, heads]; g out of range where `has` is false
    return out, jnp.where(bad, jnp.nan, jnp.where(has[..., None], lse, -jnp.inf)).astype(jnp.float32)


def cudnn_packed_part_dq(q, k, v, runs, causal: bool, out, lse, g) -> jax.Array:
    """dq (fp32) of one packed part (`cudnn_packed_part`) from the merged (out, lse) and the merged output's
    cotangent g: cuDNN's backward primitive with the runs' offsets; queries outside every run get 0."""
    q_len, kv_len, q_off, kv_off = _packed_operands(runs)
    b, t, heads, _ = q.shape
    m = q_len.shape[1]
    gi, place, has = _stats_index(runs[0], runs[1], t)
    stats = jnp.zeros((b * m, heads, t), jnp.float32).at[gi, :, place].set(lse.astype(jnp.float32), mode="drop")
    unused = jnp.zeros(0, q.dtype)
    grads = _fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, q_len, kv_len, q_off, kv_off, unused, unused, stats, out.astype(q.dtype),
        g.astype(q.dtype), scale=float(q.shape[-1]) ** -0.5, seed=42, dropout_rate=0.0,
        variadic_args=(False, False), layout=_fa.AttentionLayout.BTNH.value, sliding_window_length=None,
        mask_type=_packed_mask_type(causal))
    return jnp.where(has[..., None, None], grads[0].astype(jnp.float32), 0.0)


def segment_runs(segment_ids: jax.Array, max_runs: int):
    """The examples of packed rows (segment ids 1, 2, .. in order, 0 = pad) as runs of queries = keys for
    `cudnn_packed_part` (causal): example s is run s - 1; a row with more than max_runs examples overflows."""
    b, length = segment_ids.shape
    rows, pos = jnp.arange(b)[:, None], jnp.arange(length, dtype=jnp.int32)
    run = jnp.where(segment_ids > 0, segment_ids - 1, max_runs)
    start = segment_ids != jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    off = jnp.full((b, max_runs), -1, jnp.int32).at[rows, jnp.where(start, run, max_runs)].set(pos, mode="drop")
    n = jnp.zeros((b, max_runs), jnp.int32).at[rows, run].add(1, mode="drop")
    n, off = jnp.where(n > 0, n, -1), jnp.where(n > 0, off, -1)
    return n, off, n, off, jnp.max(segment_ids, axis=1) > max_runs
