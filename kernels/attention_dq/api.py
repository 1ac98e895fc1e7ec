"""Bindings of the dq kernel (triton_dq.py). Shapes: q, g [B, T, H, D]; k, v [B, S, KVH, D]; lse, delta
[B, T, H] float32 (delta = sum(g * out, -1) of the merged output); kv_len [B] or [B, T] int32 and, optional,
kv_start of kv_len's shape (default 0). Returns dq [B, T, H, D] float32 for keys kv_start .. kv_len - 1 of
each row (or each query). Each framework is imported when first called."""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class DQConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


def check_shapes(q, k, v, g, lse, delta, kv_len, kv_start=None) -> None:
    b, t, h, d = q.shape
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != d or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"attention_dq: k, v must be [B, S, KVH, {d}] alike, got {tuple(k.shape)}, {tuple(v.shape)}")
    if h % k.shape[2]:
        raise ValueError(f"attention_dq: {h} query heads are not a multiple of {k.shape[2]} kv heads")
    if tuple(g.shape) != tuple(q.shape) or tuple(lse.shape) != (b, t, h) or tuple(delta.shape) != (b, t, h):
        raise ValueError(f"attention_dq: g {tuple(g.shape)} must be q's shape {tuple(q.shape)}, lse {tuple(lse.shape)} "
                         f"and delta {tuple(delta.shape)} [B, T, H] = {(b, t, h)}")
    if tuple(kv_len.shape) not in ((b,), (b, t)):
        raise ValueError(f"attention_dq: kv_len must be [B] = ({b},) or [B, T] = ({b}, {t}), got {tuple(kv_len.shape)}")
    if kv_start is not None and tuple(kv_start.shape) != tuple(kv_len.shape):
        raise ValueError(f"attention_dq: kv_start {tuple(kv_start.shape)} must be kv_len's shape {tuple(kv_len.shape)}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"attention_dq: head dim {d} must be a power of two >= 16")


def _launch_args(q, k, config: DQConfig):
    b, t, h, d = q.shape
    grid = (h, -(-t // config.block_m), b)
    consts = dict(SCALE=d ** -0.5, HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    return (t, h, k.shape[1], k.shape[2]), grid, consts


def _key_ranges(xp, q, k, kv_len, kv_start):
    """(kv_start, kv_end, per_query) for the kernel, within 0 .. S: [B, T] ranges where a query's keys are
    given (kv_len [B, T] or a kv_start); else kv_end = kv_len [B] for both (the kernel reads only kv_end)."""
    b, t = q.shape[:2]
    if kv_len.ndim == 1 and kv_start is None:
        end = xp.clip(kv_len, 0, k.shape[1])
        return end, end, False
    end = kv_len if kv_len.ndim == 2 else kv_len[:, None]
    start = kv_start if kv_start is not None else xp.zeros_like(end)
    end, start = (xp.clip(xp.broadcast_to(x, (b, t)), 0, k.shape[1]) for x in (end, start))
    return start, end, True


def jax_attention_dq(q, k, v, g, lse, delta, kv_len, config: DQConfig = DQConfig(), kv_start=None):
    """JAX (GPU, jax_triton). q, k, v, g in one 16-bit dtype; no autodiff of its own (a backward's part).
    With several devices it runs under `partition_rows`: a sharded jit keeps the rows (axis 0) split as q's
    are and gathers the other axes. On one device it is the bare kernel call (as measured)."""
    import jax.numpy as jnp

    check_shapes(q, k, v, g, lse, delta, kv_len, kv_start)
    start, end, per_query = _key_ranges(jnp, q, k, kv_len, kv_start)
    return _jax_call(config, per_query)(q, k, v, g.astype(q.dtype), lse.astype(jnp.float32),
                                        delta.astype(jnp.float32), start.astype(jnp.int32), end.astype(jnp.int32))


@functools.cache
def _jax_call(config: DQConfig, per_query: bool):
    import jax
    import jax.numpy as jnp
    import jax_triton as jt

    from .triton_dq import attention_dq_kernel

    def call(q, k, v, g, lse, delta, kv_start, kv_end):
        scalars, grid, consts = _launch_args(q, k, config)
        return jt.triton_call(
            q, k, v, g, lse, delta, kv_start, kv_end, *scalars, kernel=attention_dq_kernel,
            out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32), grid=grid, num_warps=config.num_warps,
            num_stages=config.num_stages, PER_QUERY=per_query, **consts)

    return partition_rows(call, per_query) if jax.device_count() > 1 else call


def partition_rows(local, per_query: bool = True):
    """`local(q, k, v, g, lse, delta, kv_start, kv_end) -> dq` as a jax custom_partitioning op that a sharded
    jit runs per shard of rows: every operand's axis 0 split as q's is, the others whole on each device. A
    bare custom call (jax_triton's) would otherwise be run on every device over all rows. The key ranges are
    [B, T] with `per_query`, else [B]."""
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec

    op = custom_partitioning(local)

    def shardings(mesh, arg_shapes):
        spec = getattr(arg_shapes[0].sharding, "spec", ())
        rows = spec[0] if len(spec) else None
        return tuple(NamedSharding(mesh, PartitionSpec(rows, *[None] * (len(a.shape) - 1))) for a in arg_shapes)

    def partition(mesh, arg_shapes, result_shape):
        args = shardings(mesh, arg_shapes)
        return mesh, local, args[0], args

    op.def_partition(partition=partition, infer_sharding_from_operands=lambda m, a, r: shardings(m, a)[0],
                     sharding_rule="b t h d, b s k d, b s k d, b t h d, b t h, b t h, "
                                   + ("b t, b t" if per_query else "b, b") + " -> b t h d")
    return op


def torch_attention_dq(q, k, v, g, lse, delta, kv_len, config: DQConfig = DQConfig(), kv_start=None):
    """PyTorch: CUDA tensors, or CPU tensors when Triton was imported under TRITON_INTERPRET=1."""
    import torch

    from .triton_dq import INTERPRETED, attention_dq_kernel

    check_shapes(q, k, v, g, lse, delta, kv_len, kv_start)
    if not q.is_cuda and not INTERPRETED:
        raise ValueError("attention_dq: CPU tensors run only under TRITON_INTERPRET=1 (tests); use CUDA tensors")
    scalars, grid, consts = _launch_args(q, k, config)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    start, end, per_query = _key_ranges(torch, q, k, kv_len, kv_start)
    args = [a.contiguous() for a in (q, k, v, g.to(q.dtype), lse.float(), delta.float(), start.to(torch.int32),
                                     end.to(torch.int32))]
    attention_dq_kernel[grid](*args, *scalars, dq, num_warps=config.num_warps, num_stages=config.num_stages,
                              PER_QUERY=per_query, **consts)
    return dq
