"""Two-stream attention (SPEC §3).

Regular stream: plain causal attention inside each packed example, keeping every layer's K/V.
Mask stream: the k masks of anchor a attend to (i) regular K/V at indices <= a, with the k
queries folded into the head axis so one causal-attention call serves all draft steps, and
(ii) their own block (k x k, causal); the two parts merge by log-sum-exp in float32.
How both streams attend (layout, kernel, dq kernel, key bounding) is one `AttentionPlan`, resolved
once from the config and the backend (`plan_attention`); the attend functions only read it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mtp_jax.mtp.cudnn_private import cudnn_attention, cudnn_part, cudnn_part_dq
from mtp_kernels.attention_dq import jax_attention_dq
from mtp_kernels.jax_triton_support import has_jax_triton

Impl = Literal["xla", "cudnn"]
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
DQ_KERNELS = ("auto", "cudnn", "triton")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """How both streams attend, fixed for a run.

    layout: "masked" (segment and prefix masks, packed rows) or "split" (no mask: one example per row,
      the regular stream causal over the row's real tokens, the prefix as the keys before each anchor
      chunk + its causal diagonal block; `split_prefix_attention`).
    impl: the fused attention, "cudnn" or "xla" (which materialises the [queries, keys] scores).
    dq_kernel: the split layout's backward of the keys before each chunk: "triton" (dq only), else
      `impl`'s own.
    bound_keys: masked layout: also tell the fused attention where keys end (causal regular stream;
      per anchor chunk, the last anchor's prefix), so cuDNN skips key tiles no query sees.
    odd_lengths_on_xla: `impl` was chosen automatically: a call with an odd query or key length,
      which cuDNN does not take with a mask in training, runs on XLA.
    """

    layout: Literal["masked", "split"] = "masked"
    impl: Impl = "xla"
    dq_kernel: Literal["xla", "cudnn", "triton"] = "xla"
    bound_keys: bool = False
    odd_lengths_on_xla: bool = False

    @property
    def split(self) -> bool:
        return self.layout == "split"

    def impl_for(self, q: jax.Array, k: jax.Array) -> Impl:
        """The kernel for this call: `impl`, unless its lengths keep an automatic cuDNN choice off."""
        if self.impl == "cudnn" and self.odd_lengths_on_xla and (q.shape[1] % 2 or k.shape[1] % 2):
            return "xla"
        return self.impl


def cudnn_fits(dtype, head_dim: int, backend: str | None = None) -> bool:
    """cuDNN's fused attention runs here: a GPU, bf16/fp16, head dim a multiple of 8 up to 128."""
    backend = jax.default_backend() if backend is None else backend
    return (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= 128)


def resolve_dq_kernel(dq_kernel: str, impl: str) -> str:
    """Which backward forms the split's dq under cuDNN attention: 'triton' (mtp_kernels.attention_dq, needs
    jax_triton) or 'cudnn'; 'auto' -> triton where jax_triton imports. The XLA path has its own."""
    if dq_kernel not in DQ_KERNELS:
        raise ValueError(f"dq_kernel must be one of {DQ_KERNELS}, got {dq_kernel!r}")
    if impl != "cudnn":
        return impl
    if dq_kernel == "triton" and not has_jax_triton():
        raise ValueError("dq_kernel='triton' needs the jax_triton package (pip install jax-triton)")
    return "triton" if dq_kernel == "triton" or (dq_kernel == "auto" and has_jax_triton()) else "cudnn"


def plan_attention(mtp, dtype, head_dim: int, backend: str | None = None) -> AttentionPlan:
    """The plan for an `MTPConfig` (attention_impl, prefix_split, bound_keys, dq_kernel) at compute dtype
    `dtype` on `backend` (default: jax's). attention_impl 'auto' -> cuDNN where `cudnn_fits`, else XLA:
    the XLA path materialises the [queries, keys] scores (and recomputes them in the backward), far
    slower and bigger than the fused kernels on a GPU."""
    auto = mtp.attention_impl == "auto"
    impl = ("cudnn" if cudnn_fits(dtype, head_dim, backend) else "xla") if auto else mtp.attention_impl
    return AttentionPlan(layout="split" if mtp.prefix_split else "masked", impl=impl,
                         dq_kernel=resolve_dq_kernel(mtp.dq_kernel, impl), bound_keys=mtp.bound_keys,
                         odd_lengths_on_xla=auto)


def segment_causal_mask(segment_ids: jax.Array, q_index: jax.Array | None = None) -> jax.Array:
    """[batch, 1, q, keys] bool: key index <= query index, same nonzero segment.

    `q_index` [q] or [batch, q] are the query rows' indices along the key axis (default: all of
    them); an index past the end is a query that sees nothing.
    """
    keys = jnp.arange(segment_ids.shape[1])
    q_index = keys if q_index is None else q_index
    q_index = jnp.broadcast_to(q_index, (segment_ids.shape[0], q_index.shape[-1]))
    q_seg = jnp.take_along_axis(segment_ids, q_index, axis=1, mode="fill", fill_value=0)
    causal = keys[None, None, :] <= q_index[:, :, None]
    same = (q_seg[:, :, None] == segment_ids[:, None, :]) & (q_seg[:, :, None] > 0)
    return (causal & same)[:, None]


def regular_attend(segment_ids: jax.Array, plan: AttentionPlan = AttentionPlan()):
    """Causal attention within packed examples; aux = this layer's (k, v) for the mask stream
    (stacked by the decoder into [layers, batch, keys, kv, d]). `plan.bound_keys` also declares the
    attention causal, which the mask already is, so that cuDNN skips the key tiles above the diagonal.
    The split layout (one example per row, at its start): no mask at all, causal attention over the
    row's real tokens (a key length; padding queries see them too, which no valid pair reads). At 128k
    tokens the [L, L] mask alone is 16 GiB, and cuDNN reads it as a bf16 bias."""
    if plan.split:
        lengths = jnp.maximum(jnp.sum(segment_ids > 0, axis=1), 1).astype(jnp.int32)
        mask, kw = None, dict(is_causal=True, key_value_seq_lengths=lengths)
    else:
        mask, kw = segment_causal_mask(segment_ids), dict(is_causal=plan.bound_keys)

    def attend(q, k, v, layer_state):
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=plan.impl_for(q, k), **kw)
        return out, (k, v)

    return attend


def chunk_key_count(anchor_index: jax.Array, keys: int) -> jax.Array:
    """[b] int32: how many leading regular keys any anchor of the chunk can see (last real anchor + 1,
    at least 1); anchors past the end (index >= keys) see nothing and do not count."""
    last = jnp.max(jnp.where(anchor_index < keys, anchor_index, 0), axis=-1)
    return jnp.atleast_1d(last + 1).astype(jnp.int32)


def _fused(q, k, v, mask, key_count, causal, impl, return_residual=False):
    if impl == "cudnn":  # the private binding: its LSE in fp32, where the public one rounds it to q's dtype
        return cudnn_attention(q, k, v, mask, key_count, causal, return_residual)
    kw = dict(return_residual=True) if return_residual else {}
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, key_value_seq_lengths=key_count,
                                        implementation=impl, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention_lse(q, k, v, mask, key_count, causal: bool, impl: str):
    """(out, lse fp32) of jax.nn.dot_product_attention with the LSE's gradient wrt q restored; on cuDNN through
    the private binding (`cudnn_attention`), whose LSE is fp32, not rounded to q's dtype.

    jax's attention VJPs (cuDNN's and XLA's, jax 0.10-0.11) drop the cotangent of the returned LSE, and
    the two-stream merge needs it: the merged output depends on q through each part's LSE, so without it
    the q-projection adapters' gradients are wrong (test_mtp.py: test_attention_lse_gradient_reaches_q).
    d lse / d q = scale * sum_j p_j k_j = scale * attention(q, k, k), one more attention call in the
    backward. k and v get no LSE term: they are the regular stream's K/V, under
    stop_gradient."""
    out, lse = _fused(q, k, v, mask, key_count, causal, impl, return_residual=True)
    return out, lse.astype(jnp.float32)


def _attention_lse_fwd(q, k, v, mask, key_count, causal, impl):
    (out, lse), vjp = jax.vjp(lambda q, k, v: _fused(q, k, v, mask, key_count, causal, impl, return_residual=True),
                              q, k, v)
    return (out, lse.astype(jnp.float32)), (vjp, q, k, mask, key_count, lse)


def _attention_lse_bwd(causal, impl, res, g):
    vjp, q, k, mask, key_count, lse = res
    g_out, g_lse = g
    dq, dk, dv = vjp((g_out, jnp.zeros_like(lse)))
    pk = _fused(q, k, k, mask, key_count, causal, impl)  # sum_j p_j k_j per query head
    dq = dq + (g_lse[..., None] * pk.astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))).astype(dq.dtype)
    return dq, dk, dv, None, None


attention_lse.defvjp(_attention_lse_fwd, _attention_lse_bwd)


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: Impl = "xla",
                     key_count: jax.Array | None = None):
    """q [b, a, k*h, d] against regular k/v [b, s, kv, d] -> (out [b, a, k*h, d], lse [b, a, k*h] fp32)
    on `impl`.

    `key_count` [b] (optional): keys at index >= key_count[row] are masked for every query of the row;
    cuDNN takes it as the key sequence length and skips those key tiles."""
    if key_count is not None:
        key_count = jnp.broadcast_to(key_count, (q.shape[0],))
    if impl == "cudnn":
        return attention_lse(q, k, v, mask, key_count, False, "cudnn")
    if key_count is not None:
        mask = mask & (jnp.arange(k.shape[1]) < key_count[:, None, None, None])
    return _xla_prefix_attention(q, k, v, mask)


def _grouped_scores(q, k, mask):
    """Scaled fp32 scores [b, kv, group, queries, keys] of q [b, t, heads, d] against k [b, s, kv, d],
    `_NEG` where `mask` (broadcastable to [b, 1, queries, keys]) is false."""
    b, t, heads, d = q.shape
    qg = q.reshape(b, t, k.shape[2], heads // k.shape[2], d).astype(jnp.float32)
    scores = jnp.einsum("bacgd,bscd->bcgas", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    return jnp.where(mask[:, :, None], scores, _NEG)


def _softmax_attention(q, k, v, mask):
    """Attention written out in fp32: (out [b, t, heads, d] in q's dtype, lse [b, t, heads] fp32)."""
    b, t, heads, d = q.shape
    scores = _grouped_scores(q, k, mask)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [b, kv, g, t]
    out = jnp.einsum("bcgas,bscd->bacgd", jnp.exp(scores - lse[..., None]), v.astype(jnp.float32))
    return out.reshape(q.shape).astype(q.dtype), jnp.moveaxis(lse, -1, 1).reshape(b, t, heads)


# The XLA path: jax's XLA dot_product_attention (0.10) returns the LSE residual without a gradient, and the
# merge needs d(lse)/dq. Rematerialised: the backward recomputes the [queries, keys] scores rather than
# keeping every layer's fp32 scores, which grow with queries x keys, alive until the backward.
_xla_prefix_attention = jax.checkpoint(_softmax_attention)


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array):
    """Each anchor's masks among themselves: q [b, a, k, h, d], k/v [b, a, k, kv, d], causal over k.

    Returns (out [b, a, k, h, d] fp32, lse [b, a, k, h] fp32).
    """
    heads, kv_heads = q.shape[3], k.shape[3]
    group = heads // kv_heads
    qg = q.reshape(*q.shape[:3], kv_heads, group, q.shape[-1]).astype(jnp.float32)
    scores = jnp.einsum("bajcgd,bamcd->bacgjm", qg, k.astype(jnp.float32)) / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    steps = q.shape[2]
    causal = jnp.tril(jnp.ones((steps, steps), bool))
    scores = jnp.where(causal, scores, _NEG)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [b, a, kv, g, j]
    probs = jnp.exp(scores - lse[..., None])
    out = jnp.einsum("bacgjm,bamcd->bajcgd", probs, v.astype(jnp.float32))
    out = out.reshape(q.shape)
    lse = jnp.moveaxis(lse, -1, 2).reshape(q.shape[:4])  # [b, a, j, h]
    return out, lse


def _part_mask(q, k, kv_len, causal):
    """The one mask a split part needs, broadcastable to [b, 1, queries, keys]: the first kv_len[row]
    keys, or causal over a square block."""
    if causal:
        return jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    return (jnp.arange(k.shape[1]) < kv_len[:, None])[:, None, None]


def _xla_part(q, k, v, kv_len, causal):
    """One part of the split, written out in fp32 (its backward is _xla_part_dq)."""
    return _softmax_attention(q, k, v, _part_mask(q, k, kv_len, causal))


def _xla_part_dq(q, k, v, kv_len, causal, out, lse, g):
    """dq of one part from the merged (out, lse) and the merged output's cotangent g (all [b, t, heads, ...]):
    scale * sum_j p_j (g . v_j - g . out) k_j with p_j = exp(s_j - lse), as a flash-attention backward."""
    b, t, heads, d = q.shape
    kv = k.shape[2]

    def grouped(x):  # [b, t, heads, ...] -> [b, kv, group, t, ...]
        return jnp.moveaxis(x.reshape(b, t, kv, heads // kv, *x.shape[3:]).astype(jnp.float32), 1, 3)

    p = jnp.exp(_grouped_scores(q, k, _part_mask(q, k, kv_len, causal)) - grouped(lse)[..., None])
    g4 = grouped(g)
    dp = jnp.einsum("bcgad,bscd->bcgas", g4, v.astype(jnp.float32))
    ds = p * (dp - jnp.sum(g4 * grouped(out), axis=-1)[..., None])
    dq = jnp.einsum("bcgas,bscd->bacgd", ds, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    return dq.reshape(q.shape)


def _triton_part_dq(q, k, v, kv_len, causal, out, lse, g):
    """The keys-before-the-chunk part's dq from mtp_kernels' Triton kernel (dq only: cuDNN's backward also
    forms dK/dV, two of its five matmuls, for K/V under stop_gradient); the small causal block stays on cuDNN."""
    if causal:
        return cudnn_part_dq(q, k, v, kv_len, causal, out, lse, g)
    return jax_attention_dq(q, k, v, g, lse, jnp.sum(g * out, axis=-1), kv_len)


_PARTS = {"xla": (_xla_part, _xla_part_dq), "cudnn": (cudnn_part, cudnn_part_dq)}


def _split_parts(k, v, first, a):
    """(keys, values, key length, causal) of the two parts: the keys before `first` (>= 1 key; a row
    with first = 0 drops this part) and the causal diagonal block first .. first + a - 1."""
    idx = (first[:, None] + jnp.arange(a))[:, :, None, None]
    kb, vb = (jnp.take_along_axis(x, idx, axis=1, mode="fill", fill_value=0) for x in (k, v))
    return (k, v, jnp.clip(first, 1, k.shape[1]).astype(jnp.int32), False), (kb, vb, None, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def split_prefix_attention(q, k, v, first, out_x, lse_x, impl: str, dq_kernel: str = "xla"):
    """Softmax over a chunk of contiguous anchors' prefix keys and one more key set, for one example per
    row, without a mask: the regular keys before `first` ([b]; a key length, so cuDNN skips the rest),
    the causal diagonal block of keys first .. first + a - 1, and a part given as (out_x fp32, lse_x)
    (the masks' own block), merged by LSE -> out fp32 [b, a, heads, d]. For those anchors it equals
    attention under the prefix mask; other anchors of the chunk (no valid pair) get finite junk.

    The backward runs each part's attention backward from the merged output and LSE, as ring attention
    does (p_j = exp(s_j - lse) over all key sets), so the merge needs no LSE gradient and no second
    forward; only dq is formed, k and v being the regular stream's K/V under stop_gradient. With remat
    `dots` the merged (out, lse) are kept ("mask_attention"), so the backward reruns no forward part.
    `impl` runs both parts (resolved: "xla" or "cudnn"); under cuDNN, `dq_kernel` "triton" forms the dq of
    the keys before the chunk with mtp_kernels' kernel; otherwise each part runs `impl`'s own backward."""
    return _split_fwd(q, k, v, first, out_x, lse_x, impl, dq_kernel)[0]


def _split_fwd(q, k, v, first, out_x, lse_x, impl, dq_kernel):
    part = _PARTS[impl][0]
    (out1, lse1), (out2, lse2) = (part(q, *p) for p in _split_parts(k, v, first, q.shape[1]))
    lse1 = jnp.where((first > 0)[:, None, None], lse1.astype(jnp.float32), _NEG)
    out, lse = merge_lse(out1.astype(jnp.float32), lse1, out2.astype(jnp.float32), lse2.astype(jnp.float32))
    out, lse = merge_lse(out, lse, out_x, lse_x)
    out, lse = checkpoint_name(out, "mask_attention"), checkpoint_name(lse, "mask_attention")
    return out, (q, k, v, first, out_x, lse_x, out, lse)


def _split_bwd(impl, dq_kernel, res, g):
    q, k, v, first, out_x, lse_x, out, lse = res
    # the Triton dq pairs with cuDNN's block backward; the XLA path keeps its own backward for both parts
    part_dq = _triton_part_dq if dq_kernel == "triton" and impl == "cudnn" else _PARTS[impl][1]
    dq1, dq2 = (part_dq(q, *p, out, lse, g) for p in _split_parts(k, v, first, q.shape[1]))
    dq = jnp.where((first > 0)[:, None, None, None], dq1, 0.0) + dq2
    w = jnp.exp(lse_x - lse)
    return (dq.astype(q.dtype), None, None, None, w[..., None] * g, w * jnp.sum(g * (out_x - out), axis=-1))


split_prefix_attention.defvjp(_split_fwd, _split_bwd)


def merge_lse(out1, lse1, out2, lse2):
    """Softmax over the union of two disjoint key sets from each part's output and LSE -> (out, lse)."""
    m = jnp.maximum(lse1, lse2)
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
    return (out1 * w1[..., None] + out2 * w2[..., None]) / (w1 + w2)[..., None], m + jnp.log(w1 + w2)


def mask_attend(plan: AttentionPlan, steps: int, prefix_mask: jax.Array | None = None,
                key_count: jax.Array | None = None, first_anchor: jax.Array | None = None):
    """Attention for mask tokens laid out as [batch, anchors * k] (anchor-major).

    `layer_state` = this layer's (k, v) [batch, keys, kv, d] of the regular stream (the decoder
    slices it from the stacked [layers, ...] K/V of `regular_attend`). Masked layout: `prefix_mask`
    [batch, 1, anchors, keys] says which regular keys each anchor sees; `key_count` [b] (optional,
    `chunk_key_count`, with plan.bound_keys) bounds them, changing nothing but the work cuDNN skips.
    Split layout: `first_anchor` [b], the chunk's first anchor per row (`split_prefix_attention`).
    """

    def attend(q, k, v, layer_state):
        b, t, h, d = q.shape
        a = t // steps
        k_reg, v_reg = layer_state
        q5 = q.reshape(b, a, steps, h, d)
        # fold draft steps into heads as [h, k] so GQA grouping (head // (h/kv)) stays right
        q_folded = jnp.swapaxes(q5, 2, 3).reshape(b, a, h * steps, d)
        k_reg, v_reg = k_reg.astype(q.dtype), v_reg.astype(q.dtype)
        impl = plan.impl_for(q_folded, k_reg)
        out2, lse2 = block_attention(q5, k.reshape(b, a, steps, -1, d), v.reshape(b, a, steps, -1, d))
        if plan.split:
            fold = lambda x: jnp.swapaxes(x, 2, 3).reshape(b, a, h * steps, *x.shape[4:])  # noqa: E731
            out = split_prefix_attention(q_folded, k_reg, v_reg, first_anchor, fold(out2), fold(lse2), impl,
                                         plan.dq_kernel if impl == plan.impl else impl)
            return jnp.swapaxes(out.reshape(b, a, h, steps, d), 2, 3).reshape(b, t, h, d).astype(q.dtype), None
        out1, lse1 = prefix_attention(q_folded, k_reg, v_reg, prefix_mask, impl, key_count)
        out1 = jnp.swapaxes(out1.reshape(b, a, h, steps, d), 2, 3).astype(jnp.float32)
        lse1 = jnp.swapaxes(lse1.reshape(b, a, h, steps), 2, 3)
        out, _ = merge_lse(out1, lse1, out2, lse2)
        return out.reshape(b, t, h, d).astype(q.dtype), None

    return attend
