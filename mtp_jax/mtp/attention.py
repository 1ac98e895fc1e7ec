"""Two-stream attention (SPEC §3).

Regular stream: plain causal attention inside each packed example, keeping every layer's K/V.
Mask stream: the k masks of anchor a attend to (i) regular K/V at indices <= a, with the k
queries folded into the head axis so one causal-attention call serves all draft steps, and
(ii) their own block (k x k, causal); the two parts merge by log-sum-exp in float32.
How both streams attend (layout, kernel, dq kernel) is one `AttentionPlan`, resolved
once from the config and the backend (`plan_attention`); the attend functions only read it. The split
layout's parts (no mask for the fused kernels) live in `mtp.split_attention`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.mtp.cudnn_private import cudnn_attention, cudnn_packed_part, segment_runs
from mtp_jax.mtp.split_attention import (_NEG, PackedChunk, _softmax_attention, merge_lse, packed_split_attention,
                                         split_prefix_attention)
from mtp_kernels.jax_triton_support import has_jax_triton

Impl = Literal["xla", "cudnn"]
DQ_KERNELS = ("auto", "cudnn", "triton")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """How both streams attend, fixed for a run.

    layout: "masked" (segment and prefix masks) or "split" (no mask: the prefix as the keys before each
      anchor chunk + its causal diagonal block; `split_prefix_attention`, or with `packed`,
      `packed_split_attention`).
    packed: rows may hold several examples (data.packing). The split layout then attends per example
      (cuDNN's sequence packing, at most `max_segments` examples per row) and reads k+1 teacher rows per
      anchor; without it the split takes one example per row, at its start, and shares one teacher block.
    impl: the fused attention, "cudnn" or "xla" (which materialises the [queries, keys] scores).
    dq_kernel: the split layout's backward of the keys before each chunk: "triton" (dq only), else
      `impl`'s own.
    odd_lengths_on_xla: `impl` was chosen automatically: a call with an odd query or key length,
      which cuDNN does not take with a mask in training, runs on XLA.
    """

    layout: Literal["masked", "split"] = "masked"
    impl: Impl = "xla"
    dq_kernel: Literal["xla", "cudnn", "triton"] = "xla"
    odd_lengths_on_xla: bool = False
    packed: bool = False
    max_segments: int = 64

    @property
    def split(self) -> bool:
        return self.layout == "split"

    @property
    def shared_teacher(self) -> bool:
        """Each chunk's anchors are consecutive positions from its first (split layout, one example per
        row), so one block of c+k teacher rows serves every draft step; packed rows can skip positions
        between examples inside a chunk, so they keep k+1 teacher rows per anchor."""
        return self.split and not self.packed

    def impl_for(self, q: jax.Array, k: jax.Array) -> Impl:
        """The kernel for this call: `impl`, unless its lengths keep an automatic cuDNN choice off."""
        if self.impl == "cudnn" and self.odd_lengths_on_xla and (q.shape[1] % 2 or k.shape[1] % 2):
            return "xla"
        return self.impl


def check_packed_rows(segment_ids, plan: AttentionPlan) -> None:
    """Host side, before a step: the packed split on cuDNN takes at most `plan.max_segments` examples per
    row (its static number of runs; a row with more would give a NaN loss), so refuse such a batch."""
    if plan.split and plan.packed and plan.impl == "cudnn":
        most = int(np.max(segment_ids, initial=0))
        if most > plan.max_segments:
            raise ValueError(f"a row packs {most} examples, over mtp.max_segments ({plan.max_segments}) for "
                             "the packed prefix_split on cuDNN; set data.max_examples_per_row to at most "
                             "mtp.max_segments")


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
    """The plan for an `MTPConfig` (attention_impl, prefix_split, packed, dq_kernel) at compute dtype
    `dtype` on `backend` (default: jax's). attention_impl 'auto' -> cuDNN where `cudnn_fits`, else XLA:
    the XLA path materialises the [queries, keys] scores (and recomputes them in the backward), far
    slower and bigger than the fused kernels on a GPU."""
    auto = mtp.attention_impl == "auto"
    impl = ("cudnn" if cudnn_fits(dtype, head_dim, backend) else "xla") if auto else mtp.attention_impl
    return AttentionPlan(layout="split" if mtp.prefix_split else "masked", impl=impl,
                         dq_kernel=resolve_dq_kernel(mtp.dq_kernel, impl),
                         odd_lengths_on_xla=auto, packed=mtp.packed, max_segments=mtp.max_segments)


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
    (stacked by the decoder into [layers, batch, keys, kv, d]).
    The split layout (one example per row, at its start): no mask at all, causal attention over the
    row's real tokens (a key length; padding queries see them too, which no valid pair reads). At 128k
    tokens the [L, L] mask alone is 16 GiB, and cuDNN reads it as a bf16 bias. The split layout on packed
    rows under cuDNN: each example its own causal run (sequence packing, no mask; padding gets 0)."""
    packed_runs = plan.split and plan.packed and plan.impl == "cudnn"
    if packed_runs:
        runs = segment_runs(segment_ids, plan.max_segments)
    elif plan.split and not plan.packed:
        lengths = jnp.maximum(jnp.sum(segment_ids > 0, axis=1), 1).astype(jnp.int32)
        mask, kw = None, dict(is_causal=True, key_value_seq_lengths=lengths)
    else:
        mask, kw = segment_causal_mask(segment_ids), {}

    def attend(q, k, v, layer_state):
        if packed_runs:
            return cudnn_packed_part(q, k, v, runs, causal=True, with_lse=False)[0], (k, v)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=plan.impl_for(q, k), **kw)
        return out, (k, v)

    return attend


def _fused(q, k, v, mask, impl, return_residual=False):
    if impl == "cudnn":  # the private binding: its LSE in fp32, where the public one rounds it to q's dtype
        return cudnn_attention(q, k, v, mask, None, False, return_residual)
    kw = dict(return_residual=True) if return_residual else {}
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_lse(q, k, v, mask, impl: str):
    """(out, lse fp32) of jax.nn.dot_product_attention with the LSE's gradient wrt q restored; on cuDNN through
    the private binding (`cudnn_attention`), whose LSE is fp32, not rounded to q's dtype.

    jax's attention VJPs (cuDNN's and XLA's, jax 0.10-0.11) drop the cotangent of the returned LSE, and
    the two-stream merge needs it: the merged output depends on q through each part's LSE, so without it
    the q-projection adapters' gradients are wrong (test_mtp.py: test_attention_lse_gradient_reaches_q).
    d lse / d q = scale * sum_j p_j k_j = scale * attention(q, k, k), one more attention call in the
    backward. k and v get no LSE term: they are the regular stream's K/V, under
    stop_gradient."""
    out, lse = _fused(q, k, v, mask, impl, return_residual=True)
    return out, lse.astype(jnp.float32)


def _attention_lse_fwd(q, k, v, mask, impl):
    (out, lse), vjp = jax.vjp(lambda q, k, v: _fused(q, k, v, mask, impl, return_residual=True), q, k, v)
    return (out, lse.astype(jnp.float32)), (vjp, q, k, mask, lse)


def _attention_lse_bwd(impl, res, g):
    vjp, q, k, mask, lse = res
    g_out, g_lse = g
    dq, dk, dv = vjp((g_out, jnp.zeros_like(lse)))
    pk = _fused(q, k, k, mask, impl)  # sum_j p_j k_j per query head
    dq = dq + (g_lse[..., None] * pk.astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))).astype(dq.dtype)
    return dq, dk, dv, None


attention_lse.defvjp(_attention_lse_fwd, _attention_lse_bwd)


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: Impl = "xla"):
    """q [b, a, k*h, d] against regular k/v [b, s, kv, d] under `mask` -> (out [b, a, k*h, d],
    lse [b, a, k*h] fp32) on `impl`."""
    if impl == "cudnn":
        return attention_lse(q, k, v, mask, "cudnn")
    return _xla_prefix_attention(q, k, v, mask)



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



def mask_attend(plan: AttentionPlan, steps: int, prefix_mask: jax.Array | None = None,
                split_index: jax.Array | PackedChunk | None = None):
    """Attention for mask tokens laid out as [batch, anchors * k] (anchor-major).

    `layer_state` = this layer's (k, v) [batch, keys, kv, d] of the regular stream (the decoder
    slices it from the stacked [layers, ...] K/V of `regular_attend`). Masked layout: `prefix_mask`
    [batch, 1, anchors, keys] says which regular keys each anchor sees.
    Split layout: `split_index`, the chunk's first anchor per row [b] (one example per row,
    `split_prefix_attention`) or, with plan.packed, its `PackedChunk` (`packed_split_attention`).
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
            dq_kernel = plan.dq_kernel if impl == plan.impl else impl
            if plan.packed:
                out = packed_split_attention(q_folded, k_reg, v_reg, split_index, fold(out2), fold(lse2), impl,
                                             plan.max_segments, dq_kernel)
            else:
                out = split_prefix_attention(q_folded, k_reg, v_reg, split_index, fold(out2), fold(lse2), impl,
                                             dq_kernel)
            return jnp.swapaxes(out.reshape(b, a, h, steps, d), 2, 3).reshape(b, t, h, d).astype(q.dtype), None
        out1, lse1 = prefix_attention(q_folded, k_reg, v_reg, prefix_mask, impl)
        out1 = jnp.swapaxes(out1.reshape(b, a, h, steps, d), 2, 3).astype(jnp.float32)
        lse1 = jnp.swapaxes(lse1.reshape(b, a, h, steps), 2, 3)
        out, _ = merge_lse(out1, lse1, out2, lse2)
        return out.reshape(b, t, h, d).astype(q.dtype), None

    return attend
