"""Triton kernels for soft cross-entropy CE(x, t) = -sum softmax(t) * log_softmax(x).

The one Triton source shared by the PyTorch and the JAX bindings (api.py).
Forward: one program per row streams x and t once (online rescaling of per-strip
running stats, no [N, V] probabilities) and writes the loss and mx, log(dx), mt,
log(dt) (kept apart: x - mx is exact, x - (mx + log dx) loses bits at |x| ~ 1e4).
Backward: one program per (row, block) reads x and t again and writes grad_x
(and optionally grad_t); rows with cotangent 0 read nothing. Argument order is
inputs, scalars, then outputs: jax_triton.triton_call appends the outputs.
"""

import triton
import triton.language as tl

# A finite floor for the running maxima: -inf - (-inf) would give NaN in the
# online update, while any finite logit or -inf compares and subtracts cleanly.
_FLOOR = tl.constexpr(-3.0e38)
GROUP = tl.constexpr(4)  # forward: strips per step reduced in registers


@triton.jit
def soft_ce_fwd_kernel(
    x_ptr, t_ptr, mask_ptr,             # [N, V] logits (row strides below), [N] int32 row mask
    stride_x, stride_t, V,
    loss_ptr, mx_ptr, lx_ptr, mt_ptr, lt_ptr,  # [N] float32 outputs: loss, mx, log dx, mt, log dt
    BLOCK_V: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DIV: tl.constexpr,                  # a power of two dividing V and the row strides
):
    # (n // DIV) * DIV == n, but tells the compiler that DIV divides n, which
    # gives 16-byte loads; jax_triton, unlike a torch launch, does not
    # specialize integer arguments on divisibility, and tl.multiple_of does not
    # apply to scalars.
    V = V // DIV * DIV
    stride_x = stride_x // DIV * DIV
    stride_t = stride_t // DIV * DIV
    row = tl.program_id(0).to(tl.int64)  # row * stride exceeds int32 at 32k x 152k
    x_row = x_ptr + row * stride_x
    t_row = t_ptr + row * stride_t
    # A step covers BLOCK_V columns as [GROUP, W] (W = BLOCK_V // GROUP): GROUP
    # contiguous strips of W columns. With W = 8 * 32 * num_warps every thread
    # owns one 16-byte column slice in each strip, so reducing over the GROUP
    # axis stays in registers: per column one exp per tensor, and per GROUP
    # columns one rescale, with no cross-thread work in the loop.
    W: tl.constexpr = BLOCK_V // GROUP
    offs = tl.arange(0, GROUP)[:, None] * W + tl.arange(0, W)[None, :]

    m_x = tl.full([W], _FLOOR, tl.float32)
    d_x = tl.zeros([W], tl.float32)
    m_t = tl.full([W], _FLOOR, tl.float32)
    d_t = tl.zeros([W], tl.float32)
    s = tl.zeros([W], tl.float32)  # sum exp(t - m_t) * x
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=inb, other=float("-inf")).to(tl.float32)

        mx_new = tl.maximum(m_x, tl.max(x, axis=0))
        d_x = d_x * tl.exp(m_x - mx_new) + tl.sum(tl.exp(x - mx_new[None, :]), axis=0)
        m_x = mx_new

        mt_new = tl.maximum(m_t, tl.max(t, axis=0))
        a_t = tl.exp(m_t - mt_new)
        e_t = tl.exp(t - mt_new[None, :])
        # A teacher weight that is 0 in float32 contributes 0: x is floored so
        # that 0 * x is never 0 * -inf, and an underflowed rescale drops s.
        s = tl.where(a_t > 0.0, s * a_t, 0.0) + tl.sum(e_t * tl.maximum(x, _FLOOR), axis=0)
        d_t = d_t * a_t + tl.sum(e_t, axis=0)
        m_t = mt_new

    mx = tl.max(m_x, axis=0)
    dx = tl.sum(d_x * tl.exp(m_x - mx), axis=0)
    mt = tl.max(m_t, axis=0)
    scale_t = tl.exp(m_t - mt)
    dt = tl.sum(d_t * scale_t, axis=0)
    S = tl.sum(tl.where(scale_t > 0.0, s * scale_t, 0.0), axis=0)
    lx = tl.log(dx)
    lt = tl.log(dt)
    loss = (mx - S / dt) + lx
    if HAS_MASK:
        # The mask is read after the loop: a loop bound that waited on it put
        # its load latency in front of every row (forward 86% -> 94% of copy
        # bandwidth on H100). Masked rows are thus streamed, then zeroed.
        valid = tl.load(mask_ptr + row) != 0
        loss = tl.where(valid, loss, 0.0)
        mx = tl.where(valid, mx, 0.0)
        lx = tl.where(valid, lx, 0.0)
        mt = tl.where(valid, mt, 0.0)
        lt = tl.where(valid, lt, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(mx_ptr + row, mx)
    tl.store(lx_ptr + row, lx)
    tl.store(mt_ptr + row, mt)
    tl.store(lt_ptr + row, lt)


@triton.jit
def soft_ce_bwd_kernel(
    x_ptr, t_ptr, g_ptr,                # [N, V] logits, [N] float32 row cotangent (0 on masked rows)
    loss_ptr, mx_ptr, lx_ptr, mt_ptr, lt_ptr,  # [N] float32 from the forward
    stride_x, stride_t, stride_g, stride_gx, stride_gt, V,
    gx_ptr, gt_ptr,                     # [N, V] outputs in the logits' dtype (gt untouched unless GRAD_T)
    BLOCK_V: tl.constexpr,
    GRAD_T: tl.constexpr,
    DIV: tl.constexpr,                  # a power of two dividing V and the row strides
):
    V = V // DIV * DIV  # divisibility hints, as in the forward
    stride_x = stride_x // DIV * DIV
    stride_t = stride_t // DIV * DIV
    stride_gx = stride_gx // DIV * DIV
    stride_gt = stride_gt // DIV * DIV
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = cols < V
    g = tl.load(g_ptr + row * stride_g)
    live = (tl.zeros([BLOCK_V], tl.float32) + g) != 0.0
    # Rows with g == 0 (masked) write exact zeros without reading x or t, so
    # they stay zero even when their logits hold NaN or inf.
    ld = inb & live
    x = tl.load(x_ptr + row * stride_x + cols, mask=ld, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * stride_t + cols, mask=ld, other=0.0).to(tl.float32)
    mx = tl.load(mx_ptr + row)
    lx = tl.load(lx_ptr + row)
    mt = tl.load(mt_ptr + row)
    lt = tl.load(lt_ptr + row)
    p_t = tl.exp((t - mt) - lt)
    gx = tl.where(live, g * (tl.exp((x - mx) - lx) - p_t), 0.0)
    tl.store(gx_ptr + row * stride_gx + cols, gx.to(gx_ptr.dtype.element_ty), mask=inb)
    if GRAD_T:
        # dCE/dt_v = p_t,v * (-log p_x,v - CE); zero where p_t underflows.
        loss = tl.load(loss_ptr + row)
        gt = tl.where(live & (p_t > 0.0), g * p_t * ((mx - x) + lx - loss), 0.0)
        tl.store(gt_ptr + row * stride_gt + cols, gt.to(gt_ptr.dtype.element_ty), mask=inb)


# True when TRITON_INTERPRET=1 was set as this module was imported: the kernels
# then run on CPU tensors through Triton's interpreter (tests only).
INTERPRETED = not isinstance(soft_ce_fwd_kernel, triton.runtime.JITFunction)


def divisibility(*ints: int) -> int:
    """Largest power of two <= 16 dividing every argument (the kernels' DIV)."""
    d = 16
    while d > 1 and any(i % d for i in ints):
        d //= 2
    return d
