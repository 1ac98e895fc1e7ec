"""The dq-only attention kernel (mtp_kernels.attention_dq) on CPU through TRITON_INTERPRET=1, against PyTorch
float64 autograd of attention over the union of two key sets.

The kernel runs once per key set, each time with the merged output's LSE and delta, and the two dq add up
to the union's gradient wrt q (as split_prefix_attention's backward uses it). As for the soft-CE kernel,
the interpreted cases run in a child pytest process (Triton picks the interpreter at import).
"""

import os
import subprocess
import sys

import pytest
import torch

from mtp_kernels.attention_dq import DQConfig, torch_attention_dq

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child (test_interpreted_suite)")
SMALL = DQConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


@pytest.mark.skipif(INTERPRET, reason="this is the interpreted child")
def test_interpreted_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, "interpreted attention-dq tests failed:\n" + proc.stdout[-6000:] + proc.stderr[-3000:]


def _grouped(x, heads):  # [B, S, KVH, D] -> [B, S, H, D]: query head h reads kv head h // (H // KVH)
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def _union_reference(q, ka, va, kv_len, kb, vb, g):
    """float64 autograd: attention of q over keys ka[:kv_len[b]] and all of kb -> (dq, out, lse)."""
    q = q.double().requires_grad_(True)
    b, t, h, d = q.shape
    k = torch.cat([_grouped(ka, h), _grouped(kb, h)], 1).double()
    v = torch.cat([_grouped(va, h), _grouped(vb, h)], 1).double()
    s = torch.einsum("bthd,bshd->bhts", q, k) * d ** -0.5
    keep = torch.ones(b, k.shape[1], dtype=torch.bool)
    keep[:, :ka.shape[1]] = torch.arange(ka.shape[1])[None] < kv_len[:, None]
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [b, h, t]
    out = torch.einsum("bhts,bshd->bthd", torch.exp(s - lse[..., None]), v)
    (dq,) = torch.autograd.grad((out * g.double()).sum(), q)
    return dq, out.detach(), lse.transpose(1, 2).detach()


def _case(b, t, h, kvh, d, s, kv_len, dtype, config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q, g = r(b, t, h, d), r(b, t, h, d)
    ka, va, kb, vb = r(b, s, kvh, d), r(b, s, kvh, d), r(b, t, kvh, d), r(b, t, kvh, d)
    kv_len = torch.tensor(kv_len, dtype=torch.int32)
    dq_ref, out, lse = _union_reference(q, ka, va, kv_len, kb, vb, g)
    delta = (g.double() * out).sum(-1)
    dq = (torch_attention_dq(q, ka, va, g, lse, delta, kv_len, config)
          + torch_attention_dq(q, kb, vb, g, lse, delta, torch.full((b,), t, dtype=torch.int32), config))
    return dq.double(), dq_ref


@interpreted
# float16 stands for the 16-bit case: Triton 3.9's interpreter computes tl.dot of bfloat16 wrong (by ~1e10 on
# randn inputs); the GPU test runs bfloat16
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_two_key_sets_add_up_to_the_union_gradient(dtype, tol):
    """GQA (4 query heads over 2 kv heads), queries and key lengths off the block sizes, an empty row."""
    dq, ref = _case(b=3, t=21, h=4, kvh=2, d=32, s=45, kv_len=[45, 0, 17], dtype=dtype, config=SMALL)
    err = (dq - ref).abs().max() / ref.abs().max()
    assert err < tol, f"max error {err:.2e} relative to max |dq| (tolerance {tol})"


@interpreted
def test_row_without_keys_gets_zero_and_default_blocks():
    """kv_len 0: that key set adds exactly nothing; the default 128 x 64 blocks run on a ragged shape too."""
    gen = torch.Generator().manual_seed(1)
    q, g = torch.randn(1, 5, 2, 16, generator=gen), torch.randn(1, 5, 2, 16, generator=gen)
    k = torch.randn(1, 70, 1, 16, generator=gen)
    lse, delta = torch.zeros(1, 5, 2), torch.zeros(1, 5, 2)
    assert torch.equal(torch_attention_dq(q, k, k, g, lse, delta, torch.zeros(1, dtype=torch.int32), SMALL),
                       torch.zeros(1, 5, 2, 16))
    dq, ref = _case(b=1, t=5, h=2, kvh=1, d=16, s=70, kv_len=[70], dtype=torch.float32, config=DQConfig())
    assert (dq - ref).abs().max() / ref.abs().max() < 1e-4


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "k": a["k"][:, :, :1].repeat(1, 1, 3, 1), "v": a["v"][:, :, :1].repeat(1, 1, 3, 1)},
     "not a multiple"),
    (lambda a: {**a, "lse": a["lse"][:, :-1]}, "lse"),
    (lambda a: {**a, "kv_len": a["kv_len"][:0]}, "kv_len"),
])
def test_bad_shapes_raise(change, match):
    a = dict(q=torch.zeros(1, 4, 4, 16), k=torch.zeros(1, 8, 2, 16), v=torch.zeros(1, 8, 2, 16),
             g=torch.zeros(1, 4, 4, 16), lse=torch.zeros(1, 4, 4), delta=torch.zeros(1, 4, 4),
             kv_len=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match=match):
        torch_attention_dq(**change(a))
