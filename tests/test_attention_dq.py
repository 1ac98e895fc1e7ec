"""The dq-only attention kernel (mtp_kernels.attention_dq) on CPU through TRITON_INTERPRET=1, against PyTorch
float64 autograd of attention over the union of two key sets.

The kernel runs once per key set, each time with the merged output's LSE and delta, and the two dq add up
to the union's gradient wrt q (as split_prefix_attention's backward uses it). As for the soft-CE kernel,
the interpreted cases run in a child pytest process (Triton picks the interpreter at import).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import INTERPRET, cpu_devices_flags, interpreted, run_interpreted

from mtp_kernels.attention_dq import DQConfig, torch_attention_dq

SMALL = DQConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


@pytest.mark.skipif(INTERPRET, reason="this is the interpreted child")
def test_interpreted_suite():
    run_interpreted(__file__)


def _grouped(x, heads):  # [B, S, KVH, D] -> [B, S, H, D]: query head h reads kv head h // (H // KVH)
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def _union_reference(q, ka, va, keep_a, kb, vb, g):
    """float64 autograd: attention of q over the keys of ka that `keep_a` [b, t, s] marks and all of kb
    -> (dq, out, lse)."""
    q = q.double().requires_grad_(True)
    b, t, h, d = q.shape
    k = torch.cat([_grouped(ka, h), _grouped(kb, h)], 1).double()
    v = torch.cat([_grouped(va, h), _grouped(vb, h)], 1).double()
    s = torch.einsum("bthd,bshd->bhts", q, k) * d ** -0.5
    keep = torch.cat([keep_a, torch.ones(b, t, kb.shape[1], dtype=torch.bool)], 2)
    s = s.masked_fill(~keep[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [b, h, t]
    out = torch.einsum("bhts,bshd->bthd", torch.exp(s - lse[..., None]), v)
    (dq,) = torch.autograd.grad((out * g.double()).sum(), q)
    return dq, out.detach(), lse.transpose(1, 2).detach()


def _case(b, t, h, kvh, d, s, kv_len, dtype, config, seed=0, kv_start=None):
    """The kernel over key set a (keys kv_start .. kv_len - 1 per row, or per query when given [b, t]) plus
    over all of key set b, against the reference over their union."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q, g = r(b, t, h, d), r(b, t, h, d)
    ka, va, kb, vb = r(b, s, kvh, d), r(b, s, kvh, d), r(b, t, kvh, d), r(b, t, kvh, d)
    kv_len = torch.tensor(kv_len, dtype=torch.int32)
    kv_start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32)
    end = kv_len if kv_len.ndim == 2 else kv_len[:, None].expand(b, t)
    start = torch.zeros_like(end) if kv_start is None else kv_start
    key = torch.arange(s)[None, None]
    dq_ref, out, lse = _union_reference(q, ka, va, (key >= start[..., None]) & (key < end[..., None]), kb, vb, g)
    delta = (g.double() * out).sum(-1)
    dq = (torch_attention_dq(q, ka, va, g, lse, delta, kv_len, config, kv_start=kv_start)
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
def test_per_query_key_ranges():
    """Key ranges per query, as packed rows give them: runs of queries sharing a range off the block
    boundaries (so a block has masked head and tail blocks around unmasked ones), a block whose queries read
    disjoint ranges, queries that read nothing (their dq from this key set is exactly 0), and a run of causal
    ranges (part B of a packed chunk); in the third row a block reads masked head blocks, an unmasked one and
    a masked tail block (3 .. 68 and 40 .. 68 in blocks of 16 keys)."""
    t, s = 40, 70
    start = [3] * 12 + [37] * 9 + [0] * 3 + [50] * 16
    end = [35] * 12 + [69] * 9 + [0] * 3 + [50 + i + 1 for i in range(16)]
    ranges = dict(kv_len=[end, [20] * 20 + [70] * 20, [69] * 16 + [70] * 24],
                  kv_start=[start, [0] * 20 + [20] * 20, [3] * 8 + [40] * 8 + [3] * 24])
    dq, ref = _case(b=3, t=t, h=4, kvh=2, d=32, s=s, dtype=torch.float32, config=SMALL, **ranges)
    assert (dq - ref).abs().max() / ref.abs().max() < 1e-5
    gen = torch.Generator().manual_seed(2)
    q, g, k = (torch.randn(*shape, generator=gen) for shape in ((3, t, 4, 32), (3, t, 4, 32), (3, s, 2, 32)))
    dq_a = torch_attention_dq(q, k, k, g, torch.zeros(3, t, 4), torch.zeros(3, t, 4),
                              torch.tensor(ranges["kv_len"], dtype=torch.int32), SMALL,
                              kv_start=torch.tensor(ranges["kv_start"], dtype=torch.int32))
    assert torch.equal(dq_a[0, 21:24], torch.zeros(3, 4, 32))
    assert dq_a[0, 24:].abs().amax(dim=(1, 2)).min() > 0


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
    (lambda a: {**a, "kv_start": torch.zeros(1, 4, dtype=torch.int32)}, "kv_start"),
])
def test_bad_shapes_raise(change, match):
    a = dict(q=torch.zeros(1, 4, 4, 16), k=torch.zeros(1, 8, 2, 16), v=torch.zeros(1, 8, 2, 16),
             g=torch.zeros(1, 4, 4, 16), lse=torch.zeros(1, 4, 4), delta=torch.zeros(1, 4, 4),
             kv_len=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match=match):
        torch_attention_dq(**change(a))


@pytest.mark.skipif(INTERPRET, reason="a JAX child of its own")
def test_jax_op_runs_per_shard_of_rows():
    """partition_rows (the JAX op's custom partitioning) under a jit whose rows are split over a 2 x 2 CPU mesh:
    the local function sees one row per device, the result equals the unsharded one and stays split, and XLA
    gathers no operand; with key ranges per query [B, T] and per row [B]. A jnp dq of the kernel's contract
    stands in for the Triton call (GPU only)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from mtp_kernels.attention_dq.api import partition_rows
        seen = []

        def local(q, k, v, g, lse, delta, kv_start, kv_end):
            seen.append(q.shape[0])
            if kv_end.ndim == 1:  # per row: keys 0 .. kv_end - 1
                kv_end = jnp.broadcast_to(kv_end[:, None], q.shape[:2])
                kv_start = jnp.zeros_like(kv_end)
            h, d = q.shape[2], q.shape[3]
            kk, vv = (jnp.repeat(x, h // x.shape[2], axis=2) for x in (k, v))
            s = jnp.einsum("bthd,bshd->bths", q, kk) * d ** -0.5
            key = jnp.arange(k.shape[1])[None, None, None, :]
            keep = (key >= kv_start[:, :, None, None]) & (key < kv_end[:, :, None, None])
            p = jnp.where(keep, jnp.exp(s - lse[..., None]), 0.0)
            ds = p * (jnp.einsum("bthd,bshd->bths", g, vv) - delta[..., None])
            return jnp.einsum("bths,bshd->bthd", ds, kk) * d ** -0.5

        keys = jax.random.split(jax.random.key(0), 6)
        q, g = (jax.random.normal(kk, (4, 8, 4, 16)) for kk in keys[:2])
        k, v = (jax.random.normal(kk, (4, 12, 2, 16)) for kk in keys[2:4])
        lse, delta = (jax.random.normal(kk, (4, 8, 4)) + 3.0 for kk in keys[4:])
        row_end = jnp.array([12, 0, 5, 7], jnp.int32)
        start = jnp.tile(jnp.array([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32), (4, 1))
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
        rows = lambda a: jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp"), *[None] * (a.ndim - 1))))
        for per_query, ranges in ((True, (start, jnp.broadcast_to(row_end[:, None], (4, 8)))),
                                  (False, (row_end, row_end))):
            args = (q, k, v, g, lse, delta, *ranges)
            sharded = [rows(a) for a in args]
            f = jax.jit(partition_rows(local, per_query))
            out = f(*sharded)
            assert seen[-1] == 1, seen  # traced once whole (abstract evaluation), then lowered per shard
            np.testing.assert_allclose(out, local(*args), rtol=1e-5, atol=1e-6)
            assert out.sharding.spec[0] == ("data", "fsdp"), out.sharding
            assert "all-gather" not in f.lower(*sharded).compile().as_text()
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS=cpu_devices_flags(4), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_resolve_dq_kernel():
    """The split's backward choice: XLA attention keeps its own; a bad name or a Triton request without
    jax_triton (as on CPU CI) is refused; auto falls back to cuDNN's backward without jax_triton."""
    from mtp_jax.mtp.attention import resolve_dq_kernel
    from mtp_kernels.jax_triton_support import has_jax_triton

    assert resolve_dq_kernel("triton", "xla") == "xla"
    assert resolve_dq_kernel("cudnn", "cudnn") == "cudnn"
    assert resolve_dq_kernel("auto", "cudnn") == ("triton" if has_jax_triton() else "cudnn")
    with pytest.raises(ValueError, match="dq_kernel must be one of"):
        resolve_dq_kernel("pallas", "cudnn")
    if not has_jax_triton():
        with pytest.raises(ValueError, match="needs the jax_triton package"):
            resolve_dq_kernel("triton", "cudnn")
