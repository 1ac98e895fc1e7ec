"""Float64 PyTorch reference for soft cross-entropy (tests only): the textbook formula."""

from __future__ import annotations

import torch


def soft_ce(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row -sum softmax(t) * log_softmax(x) in float64; masked rows 0.

    A term whose teacher probability is exactly 0 adds 0 (no 0 * -inf)."""
    x, t = x.double(), t.double()
    p_t = torch.softmax(t, dim=-1)
    # where() on the factor, not the product, keeps autograd free of 0 * -inf.
    logp_x = torch.where(p_t > 0, torch.log_softmax(x, dim=-1), 0.0)
    loss = -(p_t * logp_x).sum(-1)
    if mask is not None:
        loss = torch.where(mask.bool(), loss, 0.0)
    return loss


def soft_ce_grads(x, t, mask=None, g=None):
    """(loss, grad_x, grad_t) of sum(g * soft_ce) by float64 autograd (g defaults to ones)."""
    x = x.detach().double().requires_grad_(True)
    t = t.detach().double().requires_grad_(True)
    loss = soft_ce(x, t, mask)
    g = torch.ones_like(loss) if g is None else g.double()
    gx, gt = torch.autograd.grad((loss * g).sum(), (x, t))
    if mask is not None:  # where() already zeroes them; this also clears NaN rows
        keep = mask.bool()[..., None]
        gx, gt = torch.where(keep, gx, 0.0), torch.where(keep, gt, 0.0)
    return loss.detach(), gx, gt


def hard_rows(v: int = 1000, seed: int = 0):
    """[7, v] float32 (x, t) rows that stress the numerics (v >= 8):
    +-1e4 logits; -inf in x, in t, and in both at the same place; all-equal rows;
    a one-hot teacher (all but one t entry -inf); a student far from its teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, v, generator=g) * 4
    t = torch.randn(7, v, generator=g) * 4
    sign = torch.randint(0, 2, (2, v), generator=g) * 2 - 1
    x[0], t[0] = 1e4 * sign[0], 1e4 * sign[1]            # +-1e4 everywhere
    x[1, ::3] = float("-inf")                             # -inf in x where t also -inf
    t[1, ::3] = float("-inf")
    t[1, 1::5] = float("-inf")                            # and -inf in t alone
    x[2], t[2] = 5.0, -3.0                                # all-equal rows
    t[3] = float("-inf")                                  # one-hot teacher
    t[3, v // 2] = 7.0
    x[3, : v // 4] = float("-inf")
    x[4] = x[4] * 1e3                                     # very peaked student
    t[5, : v // 2] = -1e4                                 # underflowing teacher half
    x[6, 1:] = float("-inf")                              # student one-hot on entry 0
    t[6, 1:] = float("-inf")
    return x, t
