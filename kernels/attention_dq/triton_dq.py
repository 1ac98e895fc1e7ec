"""Triton kernel: the query gradient of one key set of a softmax whose output and LSE are given.

    dq_i = scale * sum_{j < kv_len} p_ij (g_i . v_j - delta_i) k_j,   p_ij = exp(scale * q_i . k_j - lse_i)

with lse and delta = g . out of the whole (merged) softmax, so several key sets' dq add up to the
gradient of attention over their union, as a flash-attention or ring-attention backward forms it. Only
dq: the mask stream's prefix keys and values are the regular stream's, under stop_gradient, and a full
attention backward spends two of its five matmuls (and dK/dV accumulators) on gradients nobody reads.

Layouts are contiguous: q, g, dq [B, T, H, D]; k, v [B, S, KVH, D] (query head h reads kv head
h // (H // KVH), GQA); lse, delta [B, T, H] float32; kv_len [B] int32 (row b reads keys 0 .. kv_len[b]-1,
none when 0). One program per (query head, block of BLOCK_M queries, row); programs of one kv head run
side by side, so its keys stream once through L2. Argument order is inputs, scalars, then the output:
jax_triton.triton_call appends outputs.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dq_block(acc, q, g, lse2, delta, k_ptrs, v_ptrs, start, kv_len, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """acc + the contribution of keys start .. start + BLOCK_N - 1 (only those < kv_len when MASKED)."""
    if MASKED:
        ok = (start + tl.arange(0, BLOCK_N)) < kv_len
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])  # [M, N]
    if MASKED:
        p = tl.where(ok[None, :], p, 0.0)
    dp = tl.dot(g, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return acc + tl.dot(ds.to(k.dtype), k)


@triton.jit
def attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, kv_len_ptr,
    T, H, S, KVH,
    dq_ptr,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    head = tl.program_id(0)
    block = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)  # row offsets pass int32 at 128k keys x 8 heads x 128 x rows
    kv_head = head // (H // KVH)
    kv_len = tl.load(kv_len_ptr + row)

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

    kv_off = row * S * KVH * HEAD_DIM + kv_head * HEAD_DIM + offs_n[:, None] * (KVH * HEAD_DIM) + offs_d[None, :]
    k_ptrs = k_ptr + kv_off
    v_ptrs = v_ptr + kv_off
    step = BLOCK_N * KVH * HEAD_DIM
    qk_scale = SCALE * LOG2E
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full = kv_len // BLOCK_N * BLOCK_N
    for start in range(0, full, BLOCK_N):
        acc = _dq_block(acc, q, g, lse2, delta, k_ptrs, v_ptrs, start, kv_len, qk_scale, BLOCK_N, HEAD_DIM, False)
        k_ptrs += step
        v_ptrs += step
    if full < kv_len:
        acc = _dq_block(acc, q, g, lse2, delta, k_ptrs, v_ptrs, full, kv_len, qk_scale, BLOCK_N, HEAD_DIM, True)
    tl.store(dq_ptr + q_off, acc * SCALE, mask=in_rows[:, None])


INTERPRETED = not isinstance(attention_dq_kernel, triton.runtime.JITFunction)
