"""Tolerances of every soft-CE path against the float64 reference, per dtype (shared by the CPU
interpreted tests and the GPU tests).

Loss is float32 arithmetic in every case (bf16 inputs are upcast exactly, and the reference sees
the same rounded inputs); the gradient is stored in the input dtype, so bf16/fp16 add one
rounding of the gradient itself.
"""

import torch

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
