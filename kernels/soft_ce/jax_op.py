"""JAX binding: a custom_vjp whose rules call the Triton kernels via jax_triton.

Use it through api.jax_soft_ce. Leading axes are folded into rows before the
custom_vjp, and each kernel call is a custom_vmap that folds a vmapped axis into
rows too, so the op works under jit, vmap and shard_map (rows sharded). Without
a GPU or without jax_triton the same custom_vjp runs the jnp path.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
from jax import custom_batching

from ..jax_triton_support import has_jax_triton
from . import jnp_soft_ce
from .config import DEFAULT, SoftCEConfig, get_config

IMPLS = ("auto", "triton", "jnp")
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"soft_ce: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if jax.default_backend() == "gpu" and has_jax_triton() else "jnp"
    if impl == "triton" and not has_jax_triton():
        raise ValueError("soft_ce: impl='triton' needs the jax_triton package (pip install jax-triton)")
    return impl


def check_inputs(x, t, mask, impl: str) -> None:
    if x.shape != t.shape:
        raise ValueError(f"soft_ce: x and t shapes differ: {x.shape} vs {t.shape}")
    if x.dtype != t.dtype:
        raise ValueError(f"soft_ce: x and t dtypes differ: {x.dtype} vs {t.dtype}")
    allowed = _KERNEL_DTYPES + ((jnp.float64,) if impl == "jnp" else ())
    if x.dtype not in allowed:
        raise ValueError(f"soft_ce: dtype {x.dtype} unsupported by impl={impl!r}; use float32, bfloat16 or float16")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"soft_ce: need a non-empty last (vocabulary) axis, got shape {x.shape}")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"soft_ce: mask shape {mask.shape} must equal x.shape[:-1] = {x.shape[:-1]}")


def _varying(a) -> frozenset:
    """The shard_map axes an array varies over (the attribute moved across jax versions)."""
    aval = jax.typeof(a)
    axes = getattr(aval, "manual_axis_type", None)
    return frozenset(axes.varying) if axes is not None else frozenset(getattr(aval, "vma", ()))


def _like(out, *refs):
    """Mark a kernel output as varying over the refs' shard_map axes (jax_triton's
    abstract eval drops them, which custom_vjp then rejects)."""
    missing = tuple(frozenset().union(*map(_varying, refs)) - _varying(out))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


def _fold_rows(fn):
    """custom_vmap for a function of row-major arrays: a vmapped axis becomes more rows."""
    fn = custom_batching.custom_vmap(fn)

    @fn.def_vmap
    def rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched)]
        outs = fn(*(a.reshape(-1, *a.shape[2:]) for a in args))
        outs = tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return fn


@functools.cache
def _triton_fwd(cfg: SoftCEConfig, has_mask: bool):
    import jax_triton as jt

    from . import triton_soft_ce as kernels

    def fwd(x, t, mask_i):
        n, v = x.shape
        row = jax.ShapeDtypeStruct((n,), jnp.float32)
        return tuple(jt.triton_call(
            x, t, mask_i, v, v, v,
            kernel=kernels.soft_ce_fwd_kernel, out_shape=(row,) * 5, grid=(n,),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            BLOCK_V=cfg.block_v, HAS_MASK=has_mask, DIV=kernels.divisibility(v),
        ))

    return _fold_rows(fwd)


@functools.cache
def _triton_bwd(cfg: SoftCEConfig, grad_t: bool):
    import jax_triton as jt

    from . import triton_soft_ce as kernels

    def bwd(x, t, g, *stats):
        n, v = x.shape
        gx = jax.ShapeDtypeStruct((n, v), x.dtype)
        gt = jax.ShapeDtypeStruct((n, v) if grad_t else (1,), t.dtype)  # unused stub unless grad_t
        gx, gt = jt.triton_call(
            x, t, g, *stats, v, v, 1, v, v, v,
            kernel=kernels.soft_ce_bwd_kernel, out_shape=(gx, gt),
            grid=(n, -(-v // cfg.bwd_block_v)), num_warps=cfg.bwd_num_warps, num_stages=1,
            BLOCK_V=cfg.bwd_block_v, GRAD_T=grad_t, DIV=kernels.divisibility(v),
        )
        return (gx, gt) if grad_t else (gx,)

    return _fold_rows(bwd)


def _bench_for(dtype, v):
    """Times one config on synthetic rows of this vocabulary (for autotuning)."""

    def bench(cfg: SoftCEConfig, which: str) -> float:
        with jax.ensure_compile_time_eval():
            n = max(1, min(2048, (1 << 28) // (v * 2)))
            kx, kt = jax.random.split(jax.random.key(0))
            x = jax.random.normal(kx, (n, v), dtype)
            t = jax.random.normal(kt, (n, v), dtype)
            m = jnp.ones((n,), jnp.int32)
            fwd = jax.jit(_triton_fwd(cfg, False))
            if which == "fwd":
                call = lambda: fwd(x, t, m)  # noqa: E731
            else:
                stats = fwd(x, t, m)
                bwd = jax.jit(_triton_bwd(cfg, False))
                g = jnp.ones((n,), jnp.float32)
                call = lambda: bwd(x, t, g, *stats)  # noqa: E731
            jax.block_until_ready(call())
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready([call() for _ in range(4)])
                times.append((time.perf_counter() - t0) / 4 * 1e3)
            return statistics.median(times)

    return bench


def _config(x, impl: str, config: SoftCEConfig | None) -> SoftCEConfig:
    v = x.shape[-1]
    if config is not None:
        return config.fitted(v)
    if impl == "jnp":
        return DEFAULT.fitted(v)
    device = jax.devices()[0].device_kind
    return get_config(device, jnp.dtype(x.dtype).name, v, bench=_bench_for(x.dtype, v))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _soft_ce_rows(x, t, mask, impl, grad_t, cfg):
    return _soft_ce_fwd(x, t, mask, impl, grad_t, cfg)[0]


def _soft_ce_fwd(x, t, mask, impl, grad_t, cfg):
    if impl == "triton":
        # Without a mask the kernel skips the mask load (a stub stands in).
        mask_i = jnp.zeros((1,), jnp.int32) if mask is None else mask.astype(jnp.int32)
        stats = tuple(_like(a, x, t) for a in _triton_fwd(cfg, mask is not None)(x, t, mask_i))
    else:
        stats = jnp_soft_ce.soft_ce_fwd(x, t, mask, chunk=cfg.block_v)
    return stats[0], (x, t, mask, stats)  # stats: loss, mx, log dx, mt, log dt


def _soft_ce_bwd(impl, grad_t, cfg, res, g):
    x, t, mask, stats = res
    g = g.astype(stats[0].dtype)
    if mask is not None:
        g = jnp.where(mask, g, 0.0)  # masked rows: exact zeros, even with NaN logits
    if impl == "triton":
        gx, *gt = (_like(a, x, t, g) for a in _triton_bwd(cfg, grad_t)(x, t, g, *stats))
        gt = gt[0] if grad_t else None
    else:
        gx, gt = jnp_soft_ce.soft_ce_bwd(x, t, g, stats, grad_t)
    # Without grad_t the teacher is a constant (as under stop_gradient).
    return gx, gt, None


_soft_ce_rows.defvjp(_soft_ce_fwd, _soft_ce_bwd)


def soft_ce(x, t, mask=None, impl: str = "auto", *, grad_t: bool = False,
            config: SoftCEConfig | None = None):
    impl = resolve_impl(impl)
    check_inputs(x, t, mask, impl)
    lead, v = x.shape[:-1], x.shape[-1]
    x2, t2 = x.reshape(-1, v), t.reshape(-1, v)
    if not grad_t:
        t2 = jax.lax.stop_gradient(t2)
    m2 = None if mask is None else (mask.reshape(-1) != 0)
    loss = _soft_ce_rows(x2, t2, m2, impl, grad_t, _config(x, impl, config))
    return loss.reshape(lead)
