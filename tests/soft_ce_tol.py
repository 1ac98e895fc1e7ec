"""Tolerances of every soft-CE path against the float64 reference, per dtype, and one run of the torch
op (shared by the CPU interpreted tests and the GPU tests).

Loss is float32 arithmetic in every case (bf16 inputs are upcast exactly, and the reference sees
the same rounded inputs); the gradient is stored in the input dtype, so bf16/fp16 add one
rounding of the gradient itself.
"""

import torch

from mtp_kernels.soft_ce import torch_soft_ce

LOSS_TOL = dict(rtol=2e-6, atol=2e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=2e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=2e-7),
    torch.float16: dict(rtol=1e-3, atol=2e-7),
}


# grad_t = p_t * (-log p_x - CE) cancels two O(CE) terms: its error is
# p_t * O(ulp(CE)), so it gets an absolute floor of 2e-6.
def GRAD_T_TOL(tol):  # noqa: N802
    return dict(tol, atol=2e-6)


def torch_run(x, t, mask=None, g=None, grad_t=False, config=None):
    """loss [rows], grad_x and grad_t of sum(g * loss) through the torch op."""
    x = x.clone().requires_grad_(True)
    t = t.clone().requires_grad_(grad_t)
    loss = torch_soft_ce(x, t, mask, reduction="none", grad_t=grad_t, config=config)
    g = torch.ones_like(loss) if g is None else g
    (loss * g).sum().backward()
    return loss.detach(), x.grad, (t.grad if grad_t else None)
