"""Float64 PyTorch reference for soft cross-entropy (tests only): the textbook formula."""

from __future__ import annotations

import torch


def soft_ce(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row -sum softmax(t) * log_softmax(x) in float64; masked rows 0.

    A term whose teacher probability is exactly 0 adds 0 (no 0 * -inf)."""
    x, t = x.double(), t.double()
    p_t = torch.softmax(t, dim=-1)
    terms = torch.where(p_t > 0, p_t * torch.log_softmax(x, dim=-1), 0.0)
    loss = -terms.sum(-1)
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
