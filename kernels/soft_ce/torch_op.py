"""PyTorch binding of the soft-CE Triton kernels (a torch.autograd.Function).

Use it through api.torch_soft_ce. CUDA tensors run the compiled kernels; CPU
tensors run only when the kernels were imported under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import os

import torch
import triton

from . import triton_soft_ce as kernels
from .config import SoftCEConfig, get_config

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> None:
    if x.shape != t.shape:
        raise ValueError(f"soft_ce: x and t shapes differ: {tuple(x.shape)} vs {tuple(t.shape)}")
    if x.dtype != t.dtype:
        raise ValueError(f"soft_ce: x and t dtypes differ: {x.dtype} vs {t.dtype}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"soft_ce: dtype {x.dtype} unsupported; use float32, bfloat16 or float16")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"soft_ce: need a non-empty last (vocabulary) axis, got shape {tuple(x.shape)}")
    for name, a in (("x", x), ("t", t)):
        if a.stride(-1) != 1 and a.shape[-1] > 1:
            raise ValueError(
                f"soft_ce: {name} has a non-contiguous last dim (stride {a.stride(-1)}); "
                "call .contiguous() on it (any row stride is fine)"
            )
    if x.device != t.device:
        raise ValueError(f"soft_ce: x on {x.device}, t on {t.device}")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"soft_ce: mask shape {tuple(mask.shape)} must equal x.shape[:-1] = {tuple(x.shape[:-1])}"
        )
    if not x.is_cuda and not kernels.INTERPRETED:
        raise ValueError(
            "soft_ce: torch_soft_ce needs CUDA tensors (CPU tensors run only under "
            "TRITON_INTERPRET=1, for tests); on CPU use jax_soft_ce(impl='jnp') or the reference"
        )


def _undo_jax_triton_env() -> None:
    # Importing jax_triton sets TRITON_CACHE_DIR="", after which every Triton
    # compile in the process fails ("Could not create or locate cache dir").
    if os.environ.get("TRITON_CACHE_DIR") == "":
        del os.environ["TRITON_CACHE_DIR"]


def _rows(a: torch.Tensor) -> torch.Tensor:
    # A view whenever the leading dims collapse (any row stride); else a copy.
    return a.reshape(-1, a.shape[-1])


def _fwd(x2, t2, mask, cfg: SoftCEConfig):
    _undo_jax_triton_env()
    n, v = x2.shape
    out = [torch.empty(n, device=x2.device, dtype=torch.float32) for _ in range(5)]
    if n:
        kernels.soft_ce_fwd_kernel[(n,)](
            x2, t2, mask if mask is not None else x2, x2.stride(0), t2.stride(0), v, *out,
            BLOCK_V=cfg.block_v, HAS_MASK=mask is not None,
            DIV=kernels.divisibility(v, x2.stride(0), t2.stride(0)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out  # loss, mx, log dx, mt, log dt


def _bwd(x2, t2, g, stats, grad_t: bool, cfg: SoftCEConfig):
    _undo_jax_triton_env()
    n, v = x2.shape
    gx = torch.empty((n, v), device=x2.device, dtype=x2.dtype)
    gt = torch.empty((n, v), device=x2.device, dtype=t2.dtype) if grad_t else gx
    if n:
        grid = (n, triton.cdiv(v, cfg.bwd_block_v))
        kernels.soft_ce_bwd_kernel[grid](
            x2, t2, g, *stats,
            x2.stride(0), t2.stride(0), g.stride(0), gx.stride(0), gt.stride(0), v,
            gx, gt, BLOCK_V=cfg.bwd_block_v, GRAD_T=grad_t, num_warps=cfg.bwd_num_warps,
            DIV=kernels.divisibility(v, x2.stride(0), t2.stride(0), gx.stride(0), gt.stride(0)),
        )
    return gx, (gt if grad_t else None)


def _config(x2: torch.Tensor, config: SoftCEConfig | None) -> SoftCEConfig:
    v = x2.shape[1]
    if config is not None:
        return config.fitted(v)
    if not x2.is_cuda:
        return get_config("interpreter", str(x2.dtype).removeprefix("torch."), v)
    return get_config(torch.cuda.get_device_name(x2.device), str(x2.dtype).removeprefix("torch."), v,
                      bench=_bench_for(x2.device, x2.dtype, v))


def _bench_for(device, dtype, v):
    """Times one config on synthetic rows of this vocabulary (for autotuning)."""

    def bench(cfg: SoftCEConfig, which: str) -> float:
        from triton.testing import do_bench

        n = max(1, min(2048, (1 << 28) // (v * 2)))  # ~256 MiB per tensor
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, v, device=device, dtype=dtype, generator=gen)
        t = torch.randn(n, v, device=device, dtype=dtype, generator=gen)
        if which == "fwd":
            return do_bench(lambda: _fwd(x, t, None, cfg), warmup=5, rep=20)
        stats = _fwd(x, t, None, cfg)
        g = torch.ones(n, device=device)
        return do_bench(lambda: _bwd(x, t, g, stats, False, cfg), warmup=5, rep=20)

    return bench


class SoftCE(torch.autograd.Function):
    """Per-row soft cross-entropy of [N, V] logits; masked rows give 0 loss and 0 grad."""

    @staticmethod
    def forward(ctx, x2, t2, mask, grad_t, config):
        cfg = _config(x2, config)
        mask_i = None if mask is None else (mask.reshape(-1) != 0).to(torch.int32)
        stats = _fwd(x2, t2, mask_i, cfg)
        ctx.save_for_backward(x2, t2, mask_i, *stats)
        ctx.grad_t, ctx.cfg = grad_t, cfg
        return stats[0]

    @staticmethod
    def backward(ctx, g):
        x2, t2, mask_i, *stats = ctx.saved_tensors
        g = g.float()
        if mask_i is not None:
            g = torch.where(mask_i != 0, g, 0.0)  # masked rows: exact zeros, even with NaN logits
        gx, gt = _bwd(x2, t2, g, stats, ctx.grad_t, ctx.cfg)
        return gx, gt, None, None, None


def soft_ce(
    x: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    grad_t: bool = False,
    config: SoftCEConfig | None = None,
) -> torch.Tensor:
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"soft_ce: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    check_inputs(x, t, mask)
    lead = x.shape[:-1]
    if not grad_t:
        t = t.detach()
    loss = SoftCE.apply(_rows(x), _rows(t), mask, grad_t, config).view(lead)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    n_valid = loss.numel() if mask is None else (mask != 0).sum()
    return loss.sum() / torch.clamp(torch.as_tensor(n_valid, device=loss.device), min=1)
