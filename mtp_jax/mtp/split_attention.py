"""The split layout of the mask stream's prefix attention (`AttentionPlan.layout` "split"): no [L, L] or
[anchors, L] mask reaches a fused kernel. Each anchor chunk's prefix is two key sets, the regular keys
before the chunk's anchors of the example and the anchors' own keys (causal), merged by LSE with the masks'
own block; the backward runs each part's attention backward from the merged output and LSE.
One example per row (`split_prefix_attention`): key lengths only. Packed rows (`packed_split_attention`):
per-example runs of queries and keys (cuDNN's sequence packing on a GPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mtp_jax.mtp.cudnn_private import cudnn_packed_part, cudnn_packed_part_dq, cudnn_part, cudnn_part_dq
from mtp_kernels.attention_dq import jax_attention_dq

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


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
    """dq of one part from the merged (out, lse) and the merged output's cotangent g (`_masked_dq`)."""
    return _masked_dq(q, k, v, _part_mask(q, k, kv_len, causal), out, lse, g)


def _masked_dq(q, k, v, mask, out, lse, g):
    """dq of attention under `mask` from the merged (out, lse) and the merged output's cotangent g (all
    [b, t, heads, ...]): scale * sum_j p_j (g . v_j - g . out) k_j with p_j = exp(s_j - lse), as a
    flash-attention backward."""
    b, t, heads, d = q.shape
    kv = k.shape[2]

    def grouped(x):  # [b, t, heads, ...] -> [b, kv, group, t, ...]
        return jnp.moveaxis(x.reshape(b, t, kv, heads // kv, *x.shape[3:]).astype(jnp.float32), 1, 3)

    p = jnp.exp(_grouped_scores(q, k, mask) - grouped(lse)[..., None])
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



class PackedChunk(NamedTuple):
    """Where each anchor slot of a chunk of packed rows reads its prefix (each [b, c] int32; `packed_chunk`).

    The slot's anchor sees the regular keys kv_start .. kv_end - 1 (its example's first token up to the
    chunk's first anchor of that example: part A) and the chunk's anchors of its example up to itself
    (part B, by `segment`). A padding slot (anchor index past the row) has segment 0 and sees neither."""

    anchor_index: jax.Array
    segment: jax.Array
    kv_start: jax.Array
    kv_end: jax.Array


def _run_start(seg: jax.Array) -> jax.Array:
    """[b, c] int32: the slot where each slot's run of equal segment ids starts."""
    slot = jnp.arange(seg.shape[1], dtype=jnp.int32)
    new = seg != jnp.pad(seg[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return jax.lax.cummax(jnp.where(new, slot, 0), axis=1)


def packed_chunk(anchor_index: jax.Array, segment_ids: jax.Array) -> PackedChunk:
    """The `PackedChunk` of anchors `anchor_index` [c] or [b, c] (each row's in position order, padding
    slots last, as objective._chunks orders them) over rows `segment_ids` [b, L] (1, 2, .. per example,
    0 = pad). Exact where each example's anchors are consecutive positions (one response per example):
    then an anchor's prefix is part A + the chunk's anchors of its example up to itself."""
    b, length = segment_ids.shape
    anchor_index = jnp.broadcast_to(anchor_index, (b, anchor_index.shape[-1])).astype(jnp.int32)
    pos = jnp.arange(length, dtype=jnp.int32)
    before = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    starts = jax.lax.cummax(jnp.where(segment_ids != before, pos, 0), axis=1)  # each position's example start
    seg = jnp.take_along_axis(segment_ids, anchor_index, 1, mode="fill", fill_value=0).astype(jnp.int32)
    start = jnp.take_along_axis(starts, anchor_index, 1, mode="fill", fill_value=0)
    first = jnp.take_along_axis(anchor_index, _run_start(seg), 1)
    real = seg > 0
    return PackedChunk(anchor_index, seg, jnp.where(real, start, 0), jnp.where(real, first, 0))


def packed_part_mask(chunk: PackedChunk, keys: int, causal: bool) -> jax.Array:
    """[b, 1, c, keys] bool of one packed part: part A (keys kv_start .. kv_end - 1) or, `causal`, part B
    over the chunk's anchors (keys = c: earlier or same slot, same example)."""
    if causal:
        seg = chunk.segment
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
        return (same & jnp.tril(jnp.ones((seg.shape[1],) * 2, bool)))[:, None]
    key = jnp.arange(keys)
    return ((key >= chunk.kv_start[..., None]) & (key < chunk.kv_end[..., None]))[:, None]


def packed_part_seen(chunk: PackedChunk, causal: bool) -> jax.Array:
    """[b, c] bool: the slot sees at least one key of the part (else its LSE is _NEG, its dq 0)."""
    return chunk.segment > 0 if causal else chunk.kv_end > chunk.kv_start


def packed_runs(chunk: PackedChunk, causal: bool, max_runs: int):
    """The part as cuDNN's packed runs, each [b, max_runs] int32, -1 where unused: (q_len, q_offset,
    kv_len, kv_offset). Run m of a row is its m-th example in the chunk: queries = its anchor slots; keys =
    the same slots (part B, causal) or kv_start .. kv_end - 1 (part A; a run without keys is unused, as its
    queries see nothing). A row with more than max_runs examples in the chunk raises in
    `cudnn_private.packed_lse` (its output turns NaN)."""
    seg = chunk.segment
    b, c = seg.shape
    slot = jnp.arange(c, dtype=jnp.int32)
    new = (seg > 0) & (seg != jnp.pad(seg[:, :-1], ((0, 0), (1, 0)), constant_values=-1))
    run = jnp.where(seg > 0, jnp.cumsum(new, axis=1) - 1, max_runs)  # run of each slot (max_runs: none)
    rows = jnp.arange(b)[:, None]
    q_off = jnp.full((b, max_runs), -1, jnp.int32).at[rows, jnp.where(new, run, max_runs)].set(slot, mode="drop")
    q_len = jnp.zeros((b, max_runs), jnp.int32).at[rows, run].add(1, mode="drop")
    if causal:
        kv_off, kv_len = q_off, q_len
    else:
        at = jnp.maximum(q_off, 0)
        kv_off = jnp.take_along_axis(chunk.kv_start, at, 1)
        kv_len = jnp.take_along_axis(chunk.kv_end, at, 1) - kv_off
    used = (q_off >= 0) & (q_len > 0) & (kv_len > 0)
    overflow = jnp.sum(new, axis=1) > max_runs
    unused = jnp.int32(-1)
    return (jnp.where(used, q_len, unused), jnp.where(used, q_off, unused), jnp.where(used, kv_len, unused),
            jnp.where(used, kv_off, unused), overflow)


def _xla_packed_part(q, k, v, chunk, causal, max_runs):
    """One packed part written out in fp32 under its small mask (its backward is _xla_packed_part_dq)."""
    return _softmax_attention(q, k, v, packed_part_mask(chunk, k.shape[1], causal))


def _xla_packed_part_dq(q, k, v, chunk, causal, max_runs, out, lse, g):
    return _masked_dq(q, k, v, packed_part_mask(chunk, k.shape[1], causal), out, lse, g)


def _cudnn_packed_part(q, k, v, chunk, causal, max_runs):
    """One packed part on cuDNN: the chunk's examples as runs (at most one per anchor slot)."""
    return cudnn_packed_part(q, k, v, packed_runs(chunk, causal, min(max_runs, q.shape[1])), causal)


def _cudnn_packed_part_dq(q, k, v, chunk, causal, max_runs, out, lse, g):
    return cudnn_packed_part_dq(q, k, v, packed_runs(chunk, causal, min(max_runs, q.shape[1])), causal, out, lse, g)


def packed_key_range(chunk: PackedChunk, causal: bool):
    """(start, end) [b, c] int32: the keys each anchor slot reads in one packed part, kv_start .. kv_end - 1
    of the regular keys (part A) or, `causal`, its run's first slot up to itself (part B); empty for padding."""
    if not causal:
        return chunk.kv_start, chunk.kv_end
    real = chunk.segment > 0
    slot = jnp.arange(real.shape[1], dtype=jnp.int32)
    return jnp.where(real, _run_start(chunk.segment), 0), jnp.where(real, slot + 1, 0)


def _triton_packed_part_dq(q, k, v, chunk, causal, max_runs, out, lse, g):
    """dq of one packed part from mtp_kernels' Triton kernel over each slot's key range (`packed_key_range`).
    cuDNN's packed backward also forms dK/dV: at Qwen3-8B shapes its program asked for 59.8 GiB of
    temporaries at 8k regular tokens and 93.2 GiB at 16k (it grows with the keys)."""
    start, end = packed_key_range(chunk, causal)
    return jax_attention_dq(q, k, v, g, lse, jnp.sum(g * out, axis=-1), end, kv_start=start)


_PACKED_PARTS = {"xla": (_xla_packed_part, _xla_packed_part_dq), "cudnn": (_cudnn_packed_part, _cudnn_packed_part_dq)}


def _packed_parts(k, v, chunk):
    """(keys, values, causal) of part A (the regular keys) and part B (the chunk's anchors' own keys)."""
    idx = chunk.anchor_index[:, :, None, None]
    kb, vb = (jnp.take_along_axis(x, idx, axis=1, mode="fill", fill_value=0) for x in (k, v))
    return (k, v, False), (kb, vb, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def packed_split_attention(q, k, v, chunk: PackedChunk, out_x, lse_x, impl: str, max_runs: int = 64,
                           dq_kernel: str = "xla"):
    """`split_prefix_attention` for packed rows: q [b, c, heads, d] of a chunk's anchor slots against
    regular k/v [b, L, kv, d], as parts A and B of `chunk` (`PackedChunk`) and the given part (out_x fp32,
    lse_x) merged by LSE -> out fp32 [b, c, heads, d]; equal to attention under the prefix mask for every
    anchor with a valid pair. Backward as split_prefix_attention's (dq of each part from the merged output
    and LSE; k, v get none). `impl` "cudnn" runs both parts as cuDNN packed runs, at most `max_runs`
    examples per row in a chunk, and their backward as `dq_kernel` says ("triton": mtp_kernels' kernel over
    each slot's key range, else cuDNN's); "xla" writes them out in fp32 under their masks."""
    return _packed_fwd(q, k, v, chunk, out_x, lse_x, impl, max_runs, dq_kernel)[0]


def _packed_fwd(q, k, v, chunk, out_x, lse_x, impl, max_runs, dq_kernel):
    part = _PACKED_PARTS[impl][0]
    out, lse = out_x, lse_x
    for keys, values, causal in _packed_parts(k, v, chunk):
        o, s = part(q, keys, values, chunk, causal, max_runs)
        seen = packed_part_seen(chunk, causal)
        o = jnp.where(seen[..., None, None], o.astype(jnp.float32), 0.0)
        out, lse = merge_lse(o, jnp.where(seen[..., None], s.astype(jnp.float32), _NEG), out, lse)
    out, lse = checkpoint_name(out, "mask_attention"), checkpoint_name(lse, "mask_attention")
    return out, (q, k, v, chunk, out_x, lse_x, out, lse)


def _packed_bwd(impl, max_runs, dq_kernel, res, g):
    q, k, v, chunk, out_x, lse_x, out, lse = res
    part_dq = _triton_packed_part_dq if dq_kernel == "triton" and impl == "cudnn" else _PACKED_PARTS[impl][1]
    dq = jnp.zeros(q.shape, jnp.float32)
    for keys, values, causal in _packed_parts(k, v, chunk):
        dq_part = part_dq(q, keys, values, chunk, causal, max_runs, out, lse, g)
        dq = dq + jnp.where(packed_part_seen(chunk, causal)[..., None, None], dq_part, 0.0)
    w = jnp.exp(lse_x - lse)
    return (dq.astype(q.dtype), None, None, None, w[..., None] * g, w * jnp.sum(g * (out_x - out), axis=-1))


packed_split_attention.defvjp(_packed_fwd, _packed_bwd)
