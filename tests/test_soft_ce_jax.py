"""The JAX soft-CE op on CPU (jnp path) against the float64 reference.

Covers the same shapes and hard inputs as the interpreted Triton tests, the
custom_vjp under jit / vmap / shard_map, check_grads, and bad inputs.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from conftest import cpu_devices_flags
from mtp_kernels.soft_ce import SoftCEConfig, jax_soft_ce
from mtp_kernels.soft_ce import reference as ref

# As for the Triton kernels: float32 arithmetic for the loss, gradients stored
# in the input dtype (one bf16 rounding).
LOSS_TOL = dict(rtol=2e-6, atol=2e-5)
GRAD_TOL = {"float32": dict(rtol=1e-4, atol=2e-7), "bfloat16": dict(rtol=8e-3, atol=2e-7)}
# grad_t = p_t * (-log p_x - CE) cancels two O(CE) terms: its error is
# p_t * O(ulp(CE)), so it gets an absolute floor of 2e-6.
def GRAD_T_TOL(tol):  # noqa: N802
    return dict(tol, atol=2e-6)
SHAPES = [(1, 1), (5, 1), (3, 7), (1, 1000), (7, 1000), (3, 32769), (1, 151936)]


def _to_jax(a: torch.Tensor, dtype: str):
    return jnp.asarray(a.float().numpy()).astype(dtype)


def _to_torch(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a).copy())


def _logits(n, v, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=gen) * scale, torch.randn(n, v, generator=gen) * scale


@jax.jit
def _loss_and_grads(x, t, mask, g):
    def f(x, t):
        return jnp.sum(g * jax_soft_ce(x, t, mask, impl="jnp", grad_t=True))

    rows = jax_soft_ce(x, t, mask, impl="jnp")
    return rows, *jax.grad(f, argnums=(0, 1))(x, t)


def _check(x, t, dtype, mask=None, seed=0):
    """x, t: float32 torch; the op sees them rounded to dtype, so does the reference."""
    xj, tj = _to_jax(x, dtype), _to_jax(t, dtype)
    x, t = _to_torch(xj).double(), _to_torch(tj).double()
    g = torch.rand(x.shape[:-1], generator=torch.Generator().manual_seed(seed)) + 0.5
    mj = None if mask is None else jnp.asarray(mask.numpy())
    loss, gx, gt = _loss_and_grads(xj, tj, mj, jnp.asarray(g.numpy()))
    assert loss.dtype == jnp.float32 and gx.dtype == xj.dtype and gt.dtype == tj.dtype
    rloss, rgx, rgt = ref.soft_ce_grads(x, t, mask, g)
    torch.testing.assert_close(_to_torch(loss).double(), rloss, **LOSS_TOL, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(_to_torch(gx).double(), rgx, **GRAD_TOL[dtype], msg=lambda m: f"grad_x: {m}")
    torch.testing.assert_close(_to_torch(gt).double(), rgt, **GRAD_T_TOL(GRAD_TOL[dtype]), msg=lambda m: f"grad_t: {m}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_matches_reference(n, v, dtype):
    _check(*_logits(n, v), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extreme_logits(dtype):
    _check(*ref.hard_rows(1000), dtype)


def test_chunk_boundaries():
    """Small chunks: many steps and a last chunk shifted left over covered columns."""
    x, t = _logits(3, 1000)
    xj, tj = jnp.asarray(x.numpy()), jnp.asarray(t.numpy())
    for block in (16, 64, 512):
        got = jax_soft_ce(xj, tj, impl="jnp", config=SoftCEConfig(block_v=block))
        torch.testing.assert_close(_to_torch(got).double(), ref.soft_ce(x, t), **LOSS_TOL, msg=f"block {block}")


def test_masked_rows_zero_loss_and_grad_even_with_nan():
    x, t = _logits(6, 1000)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    x[1, 5] = float("nan")
    t[4] = float("inf")
    loss, gx, gt = _loss_and_grads(jnp.asarray(x.numpy()), jnp.asarray(t.numpy()),
                                   jnp.asarray(mask.numpy()), jnp.ones(6))
    dead = ~mask.numpy()
    assert np.all(np.asarray(loss)[dead] == 0), "masked rows must give loss 0"
    assert np.all(np.asarray(gx)[dead] == 0), "masked rows must give grad_x exactly 0"
    assert np.all(np.asarray(gt)[dead] == 0), "masked rows must give grad_t exactly 0"
    keep = mask.nonzero()[:, 0]
    _check(x[keep], t[keep], "float32")


def test_nan_poisons_only_its_row():
    x, t = _logits(4, 1000)
    x[1, 10] = float("nan")
    t[2, 999] = float("nan")
    loss, gx, _ = _loss_and_grads(jnp.asarray(x.numpy()), jnp.asarray(t.numpy()), None, jnp.ones(4))
    for r in (1, 2):
        assert np.isnan(loss[r]), f"row {r} with a NaN logit must have NaN loss"
        assert np.isnan(gx[r]).all(), f"row {r} with a NaN logit must have an all-NaN grad row"
    rloss, rgx, _ = ref.soft_ce_grads(x[[0, 3]], t[[0, 3]])
    torch.testing.assert_close(_to_torch(loss[np.array([0, 3])]).double(), rloss, **LOSS_TOL)
    torch.testing.assert_close(_to_torch(gx[np.array([0, 3])]).double(), rgx, **GRAD_TOL["float32"])


def test_check_grads_float64():
    with jax.enable_x64(True):
        x, t = (jnp.asarray(a.double().numpy()) for a in _logits(3, 37, scale=2.0))
        mask = jnp.array([True, False, True])
        f = lambda x, t: jax_soft_ce(x, t, mask, impl="jnp", grad_t=True,  # noqa: E731
                                     config=SoftCEConfig(block_v=16))
        check_grads(f, (x, t), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_teacher_is_constant_without_grad_t():
    x, t = (jnp.asarray(a.numpy()) for a in _logits(2, 50))
    gt = jax.grad(lambda t: jnp.sum(jax_soft_ce(x, t, impl="jnp")))(t)
    assert np.all(np.asarray(gt) == 0), "grad_t=False treats t as a constant"


def test_leading_dims_and_vmap():
    x, t = (jnp.asarray(a.numpy()).reshape(2, 3, 5, 100) for a in _logits(30, 100))
    mask = jnp.arange(30).reshape(2, 3, 5) % 4 != 0
    rows = jax_soft_ce(x, t, mask, impl="jnp")
    assert rows.shape == (2, 3, 5)
    vm = jax.jit(jax.vmap(jax.vmap(lambda a, b, m: jax_soft_ce(a, b, m, impl="jnp"))))(x, t, mask)
    np.testing.assert_allclose(vm, rows, rtol=1e-6, atol=1e-6, err_msg="vmap differs from leading dims")

    def total(x):
        return jnp.sum(jax_soft_ce(x, t, mask, impl="jnp"))

    per_ex = jax.vmap(jax.grad(lambda a, b, m: jnp.sum(jax_soft_ce(a, b, m, impl="jnp"))))(x, t, mask)
    np.testing.assert_allclose(per_ex, jax.grad(total)(x), rtol=1e-6, atol=1e-7,
                               err_msg="vmap of grad differs from grad")


def test_shard_map_rows_sharded():
    """Rows sharded over 2 CPU devices (a child process: device count is fixed at jax start)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        from mtp_kernels.soft_ce import jax_soft_ce
        assert jax.device_count() == 2
        mesh = Mesh(np.array(jax.devices()), ("rows",))
        x = jax.random.normal(jax.random.key(0), (8, 300)) * 3
        t = jax.random.normal(jax.random.key(1), (8, 300)) * 3
        f = lambda x, t: jax_soft_ce(x, t)
        sm = jax.shard_map(f, mesh=mesh, in_specs=(P("rows"), P("rows")), out_specs=P("rows"))
        loss = jax.jit(sm)(x, t)
        g = jax.jit(jax.grad(lambda x: jnp.sum(sm(x, t))))(x)
        np.testing.assert_allclose(loss, f(x, t), rtol=1e-6)
        np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(f(x, t)))(x), rtol=1e-5, atol=1e-8)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS=cpu_devices_flags(2), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_auto_on_cpu_is_jnp_and_matches():
    x, t = _logits(3, 200)
    xj, tj = jnp.asarray(x.numpy()), jnp.asarray(t.numpy())
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(jax_soft_ce(xj, tj), jax_soft_ce(xj, tj, impl="jnp"))


@pytest.mark.parametrize(
    "case,match",
    [
        (lambda x, t: (x, t[:, :-1], None, "jnp"), "shapes differ"),
        (lambda x, t: (x, t.astype(jnp.bfloat16), None, "jnp"), "dtypes differ"),
        (lambda x, t: (x.astype(jnp.int32), t.astype(jnp.int32), None, "jnp"), "unsupported"),
        (lambda x, t: (x, t, jnp.ones(3, bool), "jnp"), "mask shape"),
        (lambda x, t: (x[0, 0], t[0, 0], None, "jnp"), "vocabulary"),
        (lambda x, t: (x, t, None, "cuda"), "impl must be"),
    ],
    ids=["shape", "dtype", "int", "mask", "scalar", "impl"],
)
def test_bad_inputs_raise(case, match):
    x, t = (jnp.asarray(a.numpy()) for a in _logits(4, 16))
    x, t, mask, impl = case(x, t)
    with pytest.raises(ValueError, match=match):
        jax_soft_ce(x, t, mask, impl=impl)


def test_triton_impl_without_jax_triton_raises():
    from mtp_kernels.soft_ce import jax_op

    if jax_op.has_jax_triton():
        pytest.skip("jax_triton is installed")
    x, t = (jnp.asarray(a.numpy()) for a in _logits(2, 16))
    with pytest.raises(ValueError, match="jax_triton"):
        jax_soft_ce(x, t, impl="triton")


@pytest.fixture
def callback_kernels(monkeypatch):
    """impl='triton' with its kernel calls replaced by pure_callbacks of the jnp
    path: like jax_triton outputs, their results carry no shard_map axes and
    have no batching rule, so this checks the binding's plumbing on CPU."""
    from mtp_kernels.soft_ce import jax_op, jnp_soft_ce

    def as_callback(fn):
        def call(*args):
            shapes = jax.eval_shape(fn, *args)
            return jax.pure_callback(lambda *a: tuple(np.asarray(o) for o in fn(*a)), shapes, *args,
                                     vmap_method="sequential")
        return jax_op._fold_rows(call)

    def fwd(cfg, has_mask):
        return as_callback(lambda x, t, m: jnp_soft_ce.soft_ce_fwd(x, t, (m != 0) if has_mask else None))

    def bwd(cfg, grad_t):
        return as_callback(lambda x, t, g, *st: tuple(
            a for a in jnp_soft_ce.soft_ce_bwd(x, t, g, st, grad_t) if a is not None))

    monkeypatch.setattr(jax_op, "has_jax_triton", lambda: True)
    monkeypatch.setattr(jax_op, "_triton_fwd", fwd)
    monkeypatch.setattr(jax_op, "_triton_bwd", bwd)
    monkeypatch.setattr(jax_op, "_config", lambda x, impl, config: jax_op.DEFAULT.fitted(x.shape[-1]))


def test_triton_binding_plumbing_jit_vmap_shard_map(callback_kernels):
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    x, t = (jnp.asarray(a.numpy()).reshape(2, 4, 300) for a in _logits(8, 300))
    mask = jnp.array([[1, 1, 0, 1], [1, 0, 1, 1]], bool)
    want = jax_soft_ce(x, t, mask, impl="jnp")
    want_g = jax.grad(lambda x: jnp.sum(jax_soft_ce(x, t, mask, impl="jnp")))(x)

    def op(a, b, m):
        return jax_soft_ce(a, b, m, impl="triton")

    got = jax.jit(jax.vmap(op))(x, t, mask)
    got_g = jax.jit(jax.grad(lambda x: jnp.sum(jax.vmap(op)(x, t, mask))))(x)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg="vmap loss")
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-8, err_msg="vmap grad")
    mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
    sm = jax.shard_map(op, mesh=mesh, in_specs=(P(None, "rows"),) * 3, out_specs=P(None, "rows"))
    np.testing.assert_allclose(jax.jit(sm)(x, t, mask), want, rtol=1e-6, err_msg="shard_map loss")
    sm_g = jax.jit(jax.grad(lambda x: jnp.sum(sm(x, t, mask))))(x)
    np.testing.assert_allclose(sm_g, want_g, rtol=1e-5, atol=1e-8, err_msg="shard_map grad")
    g_t = jax.grad(lambda t: jnp.sum(jax_soft_ce(x, t, impl="triton", grad_t=True)))(t)
    want_gt = jax.grad(lambda t: jnp.sum(jax_soft_ce(x, t, impl="jnp", grad_t=True)))(t)
    np.testing.assert_allclose(g_t, want_gt, rtol=1e-5, atol=1e-8, err_msg="grad_t")
