"""The soft-CE Triton source and its PyTorch op, on CPU through TRITON_INTERPRET=1.

Triton picks the interpreter when it is imported, for the whole process, so the
interpreted tests run in a child pytest process that has TRITON_INTERPRET=1;
the parent runs them through `test_interpreted_suite` and never sets the
variable itself. To see each case: `TRITON_INTERPRET=1 pytest tests/test_soft_ce_triton.py`.
"""

import pytest
import torch
from conftest import INTERPRET, interpreted, run_interpreted

from mtp_kernels.soft_ce import SoftCEConfig, torch_soft_ce
from mtp_kernels.soft_ce import reference as ref

from soft_ce_tol import GRAD_T_TOL, GRAD_TOL, LOSS_TOL, torch_run  # noqa: E402


@pytest.mark.skipif(INTERPRET, reason="this is the interpreted child")
def test_interpreted_suite():
    run_interpreted(__file__)


@pytest.mark.skipif(INTERPRET, reason="needs the compiled (not interpreted) kernels")
def test_cpu_without_interpreter_raises():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        torch_soft_ce(*_logits(2, 8, torch.float32))


def _check(x, t, mask=None, grad_t=False, config=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(x.shape[:-1], generator=gen) + 0.5
    loss, gx, gt = torch_run(x, t, mask, g, grad_t, config)
    rloss, rgx, rgt = ref.soft_ce_grads(x, t, mask, g)
    assert loss.dtype == torch.float32 and gx.dtype == x.dtype
    torch.testing.assert_close(loss.double(), rloss, **LOSS_TOL, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(gx.double(), rgx, **GRAD_TOL[x.dtype], msg=lambda m: f"grad_x: {m}")
    if grad_t:
        torch.testing.assert_close(gt.double(), rgt, **GRAD_T_TOL(GRAD_TOL[x.dtype]), msg=lambda m: f"grad_t: {m}")


def _logits(n, v, dtype, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=gen) * scale).to(dtype)
    t = (torch.randn(n, v, generator=gen) * scale).to(dtype)
    return x, t


SHAPES = [(1, 1), (5, 1), (3, 7), (1, 1000), (7, 1000), (3, 32769), (1, 151936)]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_matches_reference(n, v, dtype):
    _check(*_logits(n, v, dtype))


@interpreted
def test_fp16_matches_reference():
    _check(*_logits(5, 1000, torch.float16))


@interpreted
@pytest.mark.parametrize("v", [7, 1000])
def test_small_blocks_ragged_tail(v):
    """Many loop steps and a partial last block (V not a multiple of the block)."""
    _check(*_logits(3, v, torch.float32), config=SoftCEConfig(block_v=16, bwd_block_v=64))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_logits(dtype):
    x, t = ref.hard_rows(1000)
    _check(x.to(dtype), t.to(dtype), config=SoftCEConfig(block_v=128, bwd_block_v=256))


@interpreted
def test_grad_t_matches_reference():
    x, t = ref.hard_rows(1000)
    _check(x, t, grad_t=True)
    _check(*_logits(3, 32769, torch.bfloat16), grad_t=True)


@interpreted
def test_masked_rows_zero_loss_and_grad_even_with_nan():
    x, t = _logits(6, 1000, torch.float32)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    x[1, 5] = float("nan")
    t[4] = float("inf")
    loss, gx, gt = torch_run(x, t, mask, grad_t=True)
    assert torch.equal(loss[~mask], torch.zeros(2)), "masked rows must give loss 0"
    assert torch.equal(gx[~mask], torch.zeros(2, 1000)), "masked rows must give grad_x exactly 0"
    assert torch.equal(gt[~mask], torch.zeros(2, 1000)), "masked rows must give grad_t exactly 0"
    keep = mask.nonzero()[:, 0]
    _check(x[keep], t[keep], grad_t=True)


@interpreted
def test_nan_poisons_only_its_row():
    x, t = _logits(4, 1000, torch.float32)
    x[1, 10] = float("nan")
    t[2, 999] = float("nan")
    loss, gx, _ = torch_run(x, t)
    for r in (1, 2):
        assert torch.isnan(loss[r]), f"row {r} with a NaN logit must have NaN loss"
        assert torch.isnan(gx[r]).all(), f"row {r} with a NaN logit must have an all-NaN grad row"
    rloss, rgx, _ = ref.soft_ce_grads(x[[0, 3]], t[[0, 3]])
    torch.testing.assert_close(loss[[0, 3]].double(), rloss, **LOSS_TOL)
    torch.testing.assert_close(gx[[0, 3]].double(), rgx, **GRAD_TOL[torch.float32])


@interpreted
def test_reductions():
    x, t = _logits(5, 100, torch.float32)
    mask = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
    rows = ref.soft_ce(x, t, mask)
    for reduction, want in (("sum", rows.sum()), ("mean", rows.sum() / 3)):
        xg = x.clone().requires_grad_(True)
        got = torch_soft_ce(xg, t, mask, reduction=reduction)
        got.backward()
        torch.testing.assert_close(got.double(), want, **LOSS_TOL, msg=reduction)
        _, rgx, _ = ref.soft_ce_grads(x, t, mask, torch.full((5,), 1.0 if reduction == "sum" else 1 / 3))
        torch.testing.assert_close(xg.grad.double(), rgx, **GRAD_TOL[torch.float32], msg=reduction)


@interpreted
def test_row_strides_and_leading_dims():
    big_x, big_t = _logits(6, 1500, torch.bfloat16)
    x, t = big_x[::2, :1000], big_t[1::2, 200:1200]  # row strides 3000 and 3000, offset view
    assert x.stride() == (3000, 1) and not x.is_contiguous()
    _check(x, t)
    x3, t3 = _logits(2 * 3, 777, torch.float32)
    loss = torch_soft_ce(x3.view(2, 3, 777), t3.view(2, 3, 777), reduction="none")
    assert loss.shape == (2, 3)
    torch.testing.assert_close(loss.double(), ref.soft_ce(x3, t3).view(2, 3), **LOSS_TOL)


@pytest.mark.parametrize(
    "case,match",
    [
        (lambda x, t: (x, t[:, :-1], None), "shapes differ"),
        (lambda x, t: (x, t.half(), None), "dtypes differ"),
        (lambda x, t: (x.double(), t.double(), None), "unsupported"),
        (lambda x, t: (x.t(), t.t(), None), "non-contiguous last dim"),
        (lambda x, t: (x, t, torch.ones(3, dtype=torch.bool)), "mask shape"),
        (lambda x, t: (x[0, 0], t[0, 0], None), "vocabulary"),
    ],
    ids=["shape", "dtype", "float64", "noncontig", "mask", "scalar"],
)
def test_bad_inputs_raise(case, match):
    x, t, mask = case(*_logits(4, 16, torch.float32))
    with pytest.raises(ValueError, match=match):
        torch_soft_ce(x, t, mask)
