"""The soft-CE kernels compiled on a CUDA GPU: torch op and jax-triton op vs the reference.

Skipped without CUDA. Run with XLA_PYTHON_CLIENT_PREALLOCATE=false so that JAX
and PyTorch share the GPU.
"""

import numpy as np
import pytest
import torch

from mtp_kernels.soft_ce import SoftCEConfig, jax_soft_ce, torch_soft_ce
from mtp_kernels.soft_ce import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

@pytest.fixture(autouse=True)
def no_autotune(monkeypatch):
    """Default blocks (tuning is tested once, below); configs are memoised per process."""
    monkeypatch.setenv("MTP_SOFT_CE_AUTOTUNE", "0")


from soft_ce_tol import GRAD_T_TOL, GRAD_TOL, LOSS_TOL, torch_run  # noqa: E402
SHAPES = [(1, 1), (5, 7), (7, 1000), (33, 32769), (3, 151936), (64, 128256)]


def _logits(n, v, dtype, seed=0, scale=4.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, v, device="cuda", generator=gen) * scale
    t = torch.randn(n, v, device="cuda", generator=gen) * scale
    return x.to(dtype), t.to(dtype)


def _jax():
    jax = pytest.importorskip("jax")
    from mtp_kernels.soft_ce import jax_op

    if not jax_op.has_jax_triton():
        pytest.skip("needs jax_triton")
    if jax.default_backend() != "gpu":
        pytest.skip("JAX sees no GPU")
    return jax


def _jax_run(x, t, mask=None, g=None, grad_t=False):
    """loss, grad_x, grad_t of sum(g * loss) through the jax-triton op under jit."""
    jax = _jax()
    import jax.numpy as jnp

    to_j = lambda a: None if a is None else jnp.asarray(a.cpu().float().numpy()).astype(  # noqa: E731
        str(a.dtype).removeprefix("torch.")) if a.is_floating_point() else jnp.asarray(a.cpu().numpy())
    xj, tj, mj = to_j(x), to_j(t), to_j(mask)
    gj = jnp.ones(x.shape[:-1]) if g is None else to_j(g)

    @jax.jit
    def run(x, t):
        f = lambda x, t: jnp.sum(gj * jax_soft_ce(x, t, mj, impl="triton", grad_t=grad_t))  # noqa: E731
        return jax_soft_ce(x, t, mj, impl="triton"), *jax.grad(f, argnums=(0, 1))(x, t)

    loss, gx, gt = run(xj, tj)
    back = lambda a: torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda()  # noqa: E731
    return back(loss), back(gx), back(gt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_torch_op_matches_reference(n, v, dtype):
    x, t = _logits(n, v, dtype)
    g = torch.rand(n, device="cuda") + 0.5
    loss, gx, gt = torch_run(x, t, g=g, grad_t=True)
    rloss, rgx, rgt = ref.soft_ce_grads(x.cpu(), t.cpu(), None, g.cpu())
    torch.testing.assert_close(loss.cpu().double(), rloss, **LOSS_TOL, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(gx.cpu().double(), rgx, **GRAD_TOL[dtype], msg=lambda m: f"grad_x: {m}")
    torch.testing.assert_close(gt.cpu().double(), rgt, **GRAD_T_TOL(GRAD_TOL[dtype]), msg=lambda m: f"grad_t: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_torch_op_hard_rows_masks_and_strides(dtype):
    x, t = ref.hard_rows(3000)
    x, t = x.cuda().to(dtype), t.cuda().to(dtype)
    if dtype == torch.float16:  # +-1e4 is near fp16's range; keep it finite
        x, t = x.clamp(min=-6e4), t.clamp(min=-6e4)
    loss, gx, _ = torch_run(x, t)
    rloss, rgx, _ = ref.soft_ce_grads(x.cpu(), t.cpu())
    torch.testing.assert_close(loss.cpu().double(), rloss, **LOSS_TOL)
    torch.testing.assert_close(gx.cpu().double(), rgx, **GRAD_TOL[dtype])
    # masked NaN rows, and a strided view
    big = torch.randn(8, 2 * 3000, device="cuda").to(dtype)
    xs, ts = big[:, :3000], big[:, 3000:]
    xs[1, 3] = float("nan")
    mask = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool, device="cuda")
    loss, gx, _ = torch_run(xs, ts, mask)
    rloss, rgx, _ = ref.soft_ce_grads(xs.cpu(), ts.cpu(), mask.cpu())
    torch.testing.assert_close(loss.cpu().double(), rloss, **LOSS_TOL)
    torch.testing.assert_close(gx.cpu().double(), rgx, **GRAD_TOL[dtype])


def test_torch_op_configs_agree():
    x, t = _logits(17, 50000, torch.bfloat16)
    base = torch_run(x, t, config=SoftCEConfig())
    for cfg in (SoftCEConfig(block_v=1024, num_warps=4, bwd_block_v=1024, bwd_num_warps=4),
                SoftCEConfig(block_v=8192, num_warps=16, num_stages=3, bwd_block_v=8192)):
        other = torch_run(x, t, config=cfg)
        torch.testing.assert_close(other[0], base[0], **LOSS_TOL, msg=str(cfg))
        torch.testing.assert_close(other[1].float(), base[1].float(), rtol=8e-3, atol=1e-7, msg=str(cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,v", [(1, 1), (5, 7), (33, 32769), (3, 151936)], ids=str)
def test_jax_triton_op_matches_torch_op_and_reference(n, v, dtype):
    x, t = _logits(n, v, dtype, seed=1)
    mask = torch.ones(n, dtype=torch.bool, device="cuda")
    mask[n // 2] = n < 3
    g = torch.rand(n, device="cuda") + 0.5
    jl, jgx, jgt = _jax_run(x, t, mask, g, grad_t=True)
    tl_, tgx, tgt = torch_run(x, t, mask, g, grad_t=True)
    rloss, rgx, rgt = ref.soft_ce_grads(x.cpu(), t.cpu(), mask.cpu(), g.cpu())
    torch.testing.assert_close(jl, tl_, **LOSS_TOL, msg=lambda m: f"jax vs torch loss: {m}")
    torch.testing.assert_close(jgx, tgx.float(), **GRAD_TOL[dtype], msg=lambda m: f"jax vs torch grad_x: {m}")
    torch.testing.assert_close(jl.cpu().double(), rloss, **LOSS_TOL, msg=lambda m: f"jax loss: {m}")
    torch.testing.assert_close(jgx.cpu().double(), rgx, **GRAD_TOL[dtype], msg=lambda m: f"jax grad_x: {m}")
    torch.testing.assert_close(jgt.cpu().double(), rgt, **GRAD_T_TOL(GRAD_TOL[dtype]), msg=lambda m: f"jax grad_t: {m}")


def test_jax_triton_op_vmap_and_shard_map():
    jax = _jax()
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    x = jax.random.normal(jax.random.key(0), (2, 6, 5000), jnp.bfloat16) * 4
    t = jax.random.normal(jax.random.key(1), (2, 6, 5000), jnp.bfloat16) * 4
    want = jax_soft_ce(x, t, impl="jnp")
    want_g = jax.grad(lambda x: jnp.sum(jax_soft_ce(x, t, impl="jnp")))(x)
    got = jax.jit(jax.vmap(lambda a, b: jax_soft_ce(a, b, impl="triton")))(x, t)
    got_g = jax.jit(jax.grad(lambda x: jnp.sum(jax.vmap(lambda a, b: jax_soft_ce(a, b, impl="triton"))(x, t))))(x)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5, err_msg="vmap loss")
    np.testing.assert_allclose(got_g.astype(jnp.float32), want_g.astype(jnp.float32), rtol=8e-3, atol=1e-6,
                               err_msg="vmap grad")
    mesh = Mesh(np.array(jax.devices()), ("rows",))
    sm = jax.shard_map(lambda a, b: jax_soft_ce(a, b, impl="triton"), mesh=mesh,
                       in_specs=(P(None, "rows"), P(None, "rows")), out_specs=P(None, "rows"))
    np.testing.assert_allclose(jax.jit(sm)(x, t), want, rtol=2e-6, atol=2e-5, err_msg="shard_map loss")
    sm_g = jax.jit(jax.grad(lambda x: jnp.sum(sm(x, t))))(x)
    np.testing.assert_allclose(sm_g.astype(jnp.float32), want_g.astype(jnp.float32), rtol=8e-3, atol=1e-6,
                               err_msg="shard_map grad")


def test_auto_picks_triton_on_gpu():
    _jax()
    from mtp_kernels.soft_ce import jax_op

    assert jax_op.resolve_impl("auto") == "triton"


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_autotune_writes_and_reuses_cache(framework, tmp_path, monkeypatch):
    from mtp_kernels.soft_ce import config

    monkeypatch.setenv("MTP_SOFT_CE_AUTOTUNE", "1")
    monkeypatch.setenv("MTP_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(config, "_MEMO", {})
    monkeypatch.setattr(config, "FWD_CANDIDATES", config.FWD_CANDIDATES[:2])
    monkeypatch.setattr(config, "BWD_CANDIDATES", config.BWD_CANDIDATES[:2])
    x, t = _logits(16, 20000, torch.bfloat16, seed=3)
    if framework == "torch":
        loss = torch_run(x, t)[0]
    else:
        loss = _jax_run(x, t)[0]
    torch.testing.assert_close(loss.cpu().double(), ref.soft_ce(x.cpu(), t.cpu()), **LOSS_TOL)
    table = (tmp_path / "soft_ce.json").read_text()
    assert "bfloat16|V=20000" in table, table


def test_nan_poisons_only_its_row():
    x, t = _logits(4, 70000, torch.bfloat16, seed=4)
    x[1, 10] = float("nan")
    t[2, 69999] = float("nan")
    for name, run in (("torch", torch_run), ("jax", _jax_run)):
        if name == "jax":
            _jax()
        loss, gx, _ = run(x, t)
        for r in (1, 2):
            assert torch.isnan(loss[r]), f"{name}: row {r} with a NaN logit must have NaN loss"
            assert torch.isnan(gx[r]).all(), f"{name}: row {r} with a NaN logit must have an all-NaN grad row"
        rloss, rgx, _ = ref.soft_ce_grads(x[[0, 3]].cpu(), t[[0, 3]].cpu())
        torch.testing.assert_close(loss[[0, 3]].cpu().double(), rloss, **LOSS_TOL, msg=name)
        torch.testing.assert_close(gx[[0, 3]].cpu().double(), rgx, **GRAD_TOL[torch.bfloat16], msg=name)


def test_torch_op_survives_raw_jax_triton_import():
    """jax_triton's import blanks TRITON_CACHE_DIR; the torch op must still compile."""
    pytest.importorskip("jax_triton")
    x, t = _logits(3, 1234, torch.float32, seed=5)
    loss = torch_run(x, t, config=SoftCEConfig(block_v=512, bwd_block_v=512))[0]
    torch.testing.assert_close(loss.cpu().double(), ref.soft_ce(x.cpu(), t.cpu()), **LOSS_TOL)
