"""Pure-jnp soft cross-entropy with the Triton kernels' numerics (CPU / no jax-triton).

The forward streams over the vocabulary in chunks (lax.fori_loop with online
rescaling), so no [N, V] float32 array is formed; the backward is one fused
elementwise expression. Same statistics, same conventions: masked rows give 0,
teacher weights that are 0 in the compute dtype contribute 0, NaN poisons its row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_FLOOR = -3.0e38  # finite floor for running maxima, as in triton_soft_ce.py


def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def soft_ce_fwd(x, t, mask, chunk: int = 4096):
    """x, t: [N, V]; mask: [N] bool or None. Returns loss, mx, log dx, mt, log dt, each [N] (compute dtype)."""
    v = x.shape[1]
    cd = _compute_dtype(x.dtype)
    c = min(chunk, v)
    n_chunks = -(-v // c)
    cols = jnp.arange(c)

    def chunk_stats(i):
        start = i * c
        # The last chunk is shifted left to stay in bounds; columns an earlier
        # chunk already covered are masked out.
        s0 = jnp.minimum(start, v - c)
        fresh = (s0 + cols) >= start
        xc = jnp.where(fresh, lax.dynamic_slice_in_dim(x, s0, c, axis=1).astype(cd), -jnp.inf)
        tc = jnp.where(fresh, lax.dynamic_slice_in_dim(t, s0, c, axis=1).astype(cd), -jnp.inf)
        m_x = jnp.maximum(jnp.max(xc, axis=1), _FLOOR)
        m_t = jnp.maximum(jnp.max(tc, axis=1), _FLOOR)
        e_t = jnp.exp(tc - m_t[:, None])
        return (m_x, jnp.sum(jnp.exp(xc - m_x[:, None]), axis=1),
                m_t, jnp.sum(e_t, axis=1), jnp.sum(jnp.where(e_t > 0, e_t * xc, 0.0), axis=1))

    def merge(i, acc):
        # The carry starts from chunk 0 (not from constants) so that it has the
        # inputs' sharding type inside shard_map.
        m_x, d_x, m_t, d_t, s = acc
        cm_x, cd_x, cm_t, cd_t, cs = chunk_stats(i)
        mx_new, mt_new = jnp.maximum(m_x, cm_x), jnp.maximum(m_t, cm_t)
        a_x, b_x = jnp.exp(m_x - mx_new), jnp.exp(cm_x - mx_new)
        a_t, b_t = jnp.exp(m_t - mt_new), jnp.exp(cm_t - mt_new)
        # A teacher weight that is 0 in the compute dtype contributes 0 (never 0 * -inf).
        s = jnp.where(a_t > 0, s * a_t, 0.0) + jnp.where(b_t > 0, cs * b_t, 0.0)
        return mx_new, d_x * a_x + cd_x * b_x, mt_new, d_t * a_t + cd_t * b_t, s

    m_x, d_x, m_t, d_t, s = lax.fori_loop(1, n_chunks, merge, chunk_stats(0))
    lx, lt = jnp.log(d_x), jnp.log(d_t)
    loss = (m_x - s / d_t) + lx
    stats = (loss, m_x, lx, m_t, lt)
    return stats if mask is None else tuple(jnp.where(mask, a, 0.0) for a in stats)


def soft_ce_bwd(x, t, g, stats, grad_t: bool = False):
    """g: [N] cotangent, already 0 on masked rows. Returns grad_x (and grad_t or None)."""
    cd = _compute_dtype(x.dtype)
    loss, mx, lx, mt, lt = (a[:, None] for a in stats)
    live = (g != 0)[:, None]
    xf = x.astype(cd)
    p_t = jnp.exp((t.astype(cd) - mt) - lt)
    gx = jnp.where(live, g[:, None] * (jnp.exp((xf - mx) - lx) - p_t), 0.0).astype(x.dtype)
    if not grad_t:
        return gx, None
    gt = jnp.where(live & (p_t > 0), g[:, None] * p_t * ((mx - xf) + lx - loss), 0.0)
    return gx, gt.astype(t.dtype)

