"""Triton kernel: the query gradient of one key set of a softmax whose output and LSE are given.

    dq_i = scale * sum_{kv_start_i <= j < kv_end_i} p_ij (g_i . v_j - delta_i) k_j,
    p_ij = exp(scale * q_i . k_j - lse_i)

with lse and delta = g . out of the whole (merged) softmax, so several key sets' dq add up to the
gradient of attention over their union, as a flash-attention or ring-attention backward forms it. Only
dq: the mask stream's prefix keys and values are the regular stream's, under stop_gradient, and a full
attention backward spends two of its five matmuls (and dK/dV accumulators) on gradients nobody reads.

Layouts are contiguous: q, g, dq [B, T, H, D]; k, v [B, S, KVH, D] (query head h reads kv head
h // (H // KVH), GQA); lse, delta [B, T, H] float32. The keys: with PER_QUERY, kv_start, kv_end [B, T]
int32 (query t of row b reads keys kv_start .. kv_end - 1, none when kv_end <= kv_start); without it,
kv_end [B] (row b reads keys 0 .. kv_end - 1; kv_start is not read). One program per (query head, block of
BLOCK_M queries, row); programs of one kv head run side by side, so its keys stream once through L2. A
block visits the keys any of its queries reads; key blocks every query reads in full run without a mask.
Argument order is inputs, scalars, then the output: jax_triton.triton_call appends outputs.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dq_block(acc, q, g, lse2, delta, k_ptrs, v_ptrs, start, kv_start, kv_end, S, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """acc + the contribution of keys start .. start + BLOCK_N - 1 (when MASKED, only those in each query's
    kv_start .. kv_end - 1)."""
    if MASKED:
        key = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptrs, mask=(key < S)[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=(key < S)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])  # [M, N]
    if MASKED:
        p = tl.where((key[None, :] >= kv_start[:, None]) & (key[None, :] < kv_end[:, None]), p, 0.0)
    dp = tl.dot(g, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return acc + tl.dot(ds.to(k.dtype), k)


@triton.jit
def attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, kv_start_ptr, kv_end_ptr,
    T, H, S, KVH,
    dq_ptr,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PER_QUERY: tl.constexpr,
):
    head = tl.program_id(0)
    block = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)  # row offsets pass int32 at 128k keys x 8 heads x 128 x rows
    kv_head = head // (H // KVH)

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_rows = offs_m < T
    q_off = row * T * H * HEAD_DIM + head * HEAD_DIM + offs_m[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=in_rows[:, None], other=0.0)
    g = tl.load(g_ptr + q_off, mask=in_rows[:, None], other=0.0)
    l_off = row * T * H + head + offs_m * H
    lse2 = tl.load(lse_ptr + l_off, mask=in_rows, other=0.0) * LOG2E  # rows past T: p = 1, ds = 0
    delta = tl.load(delta_ptr + l_off, mask=in_rows, other=0.0)

    if PER_QUERY:
        kv_start = tl.load(kv_start_ptr + row * T + offs_m, mask=in_rows, other=0)
        kv_end = tl.load(kv_end_ptr + row * T + offs_m, mask=in_rows, other=0)
        # the keys any query of the block reads (lo .. hi - 1), and those all of them read (all_lo .. all_hi - 1;
        # rows past T have q = g = 0 and add nothing, so they do not narrow it)
        some = in_rows & (kv_start < kv_end)
        lo = tl.min(tl.where(some, kv_start, S))
        hi = tl.max(tl.where(some, kv_end, 0))
        all_lo = tl.max(tl.where(in_rows, kv_start, 0))
        all_hi = tl.min(tl.where(in_rows, kv_end, S))
        blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
        head_blocks = tl.minimum(tl.cdiv(tl.maximum(all_lo - lo, 0), BLOCK_N), blocks)
        full_blocks = tl.maximum(tl.minimum((all_hi - lo) // BLOCK_N - head_blocks, blocks - head_blocks), 0)
    else:  # one range per row: keys 0 .. kv_len - 1, as one-example rows read them
        kv_len = tl.load(kv_end_ptr + row)
        kv_start = tl.zeros([BLOCK_M], tl.int32)
        kv_end = kv_start + kv_len
        lo = 0
        blocks = tl.cdiv(kv_len, BLOCK_N)
        head_blocks = 0
        full_blocks = kv_len // BLOCK_N

    kv_off = row * S * KVH * HEAD_DIM + kv_head * HEAD_DIM + offs_n[:, None] * (KVH * HEAD_DIM) + offs_d[None, :]
    step = BLOCK_N * KVH * HEAD_DIM
    qk_scale = SCALE * LOG2E
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Two loops, two inlined block bodies: the blocks every query reads in full, without a mask, then the
    # masked ones (those before them, then those after). With three (head, full and tail blocks apart) the
    # one-range rows' dq ran 1.6-1.8x slower on an H100 than this loop structure had on an H200
    # (benchmarks/results/attention_dq_2026-12-07_h100.md).
    k_ptrs = k_ptr + kv_off + (lo + head_blocks * BLOCK_N) * (KVH * HEAD_DIM)
    v_ptrs = v_ptr + kv_off + (lo + head_blocks * BLOCK_N) * (KVH * HEAD_DIM)
    for i in range(0, full_blocks):
        acc = _dq_block(acc, q, g, lse2, delta, k_ptrs, v_ptrs, 0, kv_start, kv_end, S, qk_scale,
                        BLOCK_N, HEAD_DIM, False)
        k_ptrs += step
        v_ptrs += step
    for i in range(0, blocks - full_blocks):
        start = lo + tl.where(i < head_blocks, i, i + full_blocks) * BLOCK_N
        k_ptrs = k_ptr + kv_off + start * (KVH * HEAD_DIM)
        v_ptrs = v_ptr + kv_off + start * (KVH * HEAD_DIM)
        acc = _dq_block(acc, q, g, lse2, delta, k_ptrs, v_ptrs, start, kv_start, kv_end, S, qk_scale,
                        BLOCK_N, HEAD_DIM, True)
    tl.store(dq_ptr + q_off, acc * SCALE, mask=in_rows[:, None])


INTERPRETED = not isinstance(attention_dq_kernel, triton.runtime.JITFunction)
