"""Draft losses over row chunks (SPEC §5-§6): soft cross-entropy of sampler logits against the
base model's logits, without ever holding [all mask tokens, vocab] logits at once.

Each row chunk projects student and teacher hidden states through the frozen output matrix, runs
the soft-CE op (Triton on GPU, chunked jnp on CPU) and forms the gradient wrt the student's hidden
rows in the same pass, as fused linear cross-entropy kernels do: the backward only scales it, so
no logits are kept or recomputed and peak memory is O(row_chunk x vocab).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtp_kernels.soft_ce import jax_soft_ce


def _pad_rows(x, rows):
    pad = rows - x.shape[0]
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


def soft_ce_rows(student_h: jax.Array, teacher_h: jax.Array, valid: jax.Array, out_matrix: jax.Array,
                 row_chunk: int, impl: str = "auto"):
    """Per-row soft-CE and argmaxes for hidden rows [n, d] (student and teacher) under logits =
    h @ out_matrix [d, vocab].

    Returns (ce [n] fp32, zero where not valid; student argmax [n]; teacher argmax [n]).
    Gradients flow to `student_h` (and through it to adapters); the teacher is constant.
    """
    return _rows(student_h, teacher_h, valid, out_matrix, row_chunk, impl, lambda t, w: t @ w.astype(t.dtype))


def soft_ce_rows_vs_logits(student_h: jax.Array, teacher_logits: jax.Array, valid: jax.Array,
                           out_matrix: jax.Array, row_chunk: int, impl: str = "auto"):
    """`soft_ce_rows` against the teacher's logits [n, vocab] themselves (formed once for rows that
    several draft steps share)."""
    return _rows(student_h, teacher_logits, valid, out_matrix, row_chunk, impl, lambda t, w: t)


def _rows(student_h, teacher, valid, out_matrix, row_chunk, impl, teacher_logits):
    """Row chunks of `_project_soft_ce`; `teacher_logits(teacher chunk, out_matrix)` gives a chunk's teacher
    logits (constants: formed in the chunk, never kept for the backward)."""
    n = student_h.shape[0]
    chunk = max(1, min(row_chunk, n))
    rows = -(-n // chunk) * chunk
    s = _pad_rows(student_h, rows).reshape(rows // chunk, chunk, -1)
    t = _pad_rows(jax.lax.stop_gradient(teacher), rows).reshape(rows // chunk, chunk, -1)
    m = _pad_rows(valid, rows).reshape(rows // chunk, chunk)
    w = jax.lax.stop_gradient(out_matrix)
    ce, s_arg, t_arg = jax.lax.map(lambda args: _project_soft_ce(args[0], teacher_logits(args[1], w), args[2], w, impl),
                                   (s, t, m))
    return ce.reshape(rows)[:n], s_arg.reshape(rows)[:n], t_arg.reshape(rows)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _project_soft_ce(s, teacher_logits, mask, w, impl):
    """One row chunk: (soft-CE of s @ w against `teacher_logits`, student argmax, teacher argmax).
    Differentiable wrt s only (the teacher, mask and output matrix are constants of the objective)."""
    return _project_soft_ce_fwd(s, teacher_logits, mask, w, impl)[0]


def _project_soft_ce_fwd(s, teacher_logits, mask, w, impl):
    # d ce / d s per row, formed now (the rows are independent, so the backward's cotangent only scales
    # it): the backward then needs neither the [rows, vocab] logits nor a second pass of both matmuls,
    # which a rematerialised chunk paid (2 of its 5 d x vocab matmuls per row).
    x = s @ w.astype(s.dtype)
    teacher = teacher_logits.astype(x.dtype)
    ce, vjp = jax.vjp(lambda x: jax_soft_ce(x, teacher, mask, impl=impl), x)
    (dx,) = vjp(jnp.ones_like(ce))
    ds = dx.astype(x.dtype) @ w.astype(s.dtype).T
    return (ce, jnp.argmax(x, -1).astype(jnp.int32), jnp.argmax(teacher, -1).astype(jnp.int32)), ds


def _project_soft_ce_bwd(impl, ds, g):
    return (g[0][:, None] * ds).astype(ds.dtype), None, None, None


_project_soft_ce.defvjp(_project_soft_ce_fwd, _project_soft_ce_bwd)


def argmax_rows(h: jax.Array, out_matrix: jax.Array, row_chunk: int) -> jax.Array:
    """argmax(h @ out_matrix) for rows [n, d] in row chunks (no gradient)."""
    n = h.shape[0]
    chunk = max(1, min(row_chunk, n))
    rows = -(-n // chunk) * chunk
    hs = _pad_rows(jax.lax.stop_gradient(h), rows).reshape(rows // chunk, chunk, -1)
    arg = jax.lax.map(lambda c: jnp.argmax(c @ out_matrix.astype(c.dtype), -1).astype(jnp.int32), hs)
    return arg.reshape(rows)[:n]
