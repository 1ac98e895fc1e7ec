"""The private cuDNN binding (mtp_jax/mtp/cudnn_private.py) still fits the installed jax."""

import jax
import jax.numpy as jnp
import pytest

from mtp_jax.mtp.cudnn_private import cudnn_part_dq


def test_private_cudnn_backward_binding_still_fits():
    """split_prefix_attention's cuDNN backward binds jax's private backward primitive (jax 0.10-0.11): its
    abstract evaluation, which runs without a GPU, still takes these operands and parameters and gives dq
    in q's shape, for both parts (a key length; causal). Run on cuDNN in tests/test_mtp_gpu.py."""
    q = jax.ShapeDtypeStruct((2, 64, 32, 128), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((2, 64, 32), jnp.float32)
    for keys, kv_len, causal in ((256, jnp.array([3, 100]), False), (64, None, True)):
        k = jax.ShapeDtypeStruct((2, keys, 8, 128), jnp.bfloat16)
        dq = jax.eval_shape(lambda q, k, lse: cudnn_part_dq(q, k, k, kv_len, causal, q, lse, q), q, k, lse)
        assert (dq.shape, dq.dtype) == (q.shape, jnp.float32)


@pytest.mark.parametrize("variant", ["mask", "key lengths", "causal"])
def test_private_cudnn_attention_binding_still_fits(monkeypatch, variant):
    """jax's private forward binding, traced without a GPU (its cuDNN version check faked), still takes what
    our calls pass and gives the LSE in fp32 (the public binding's is bf16 here): a boolean mask, through
    attention_lse (the masked layout's prefix; its custom VJP gives dq in q's shape and dtype), and key
    lengths or causality, through cudnn_part (the split's parts). Run on cuDNN in tests/test_mtp_gpu.py."""
    from jax._src.cudnn import fused_attention_stablehlo

    from mtp_jax.mtp.attention import attention_lse
    from mtp_jax.mtp.cudnn_private import cudnn_part

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    q = jax.ShapeDtypeStruct((2, 64, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 64 if variant == "causal" else 256, 8, 128), jnp.bfloat16)
    m = jax.ShapeDtypeStruct((2, 1, 64, k.shape[1]), jnp.bool_)

    def f(q, k, m):
        if variant != "mask":
            out, lse = cudnn_part(q, k, k, jnp.array([3, 100], jnp.int32) if variant == "key lengths" else None,
                                  variant == "causal")
            return out, lse, q
        out, lse = attention_lse(q, k, k, m, "cudnn")
        return out, lse, jax.grad(lambda q: jnp.sum(attention_lse(q, k, k, m, "cudnn")[1]))(q)

    out, lse, dq = jax.eval_shape(f, q, k, m)
    assert (out.shape, out.dtype) == (q.shape, jnp.bfloat16)
    assert (lse.shape, lse.dtype) == (q.shape[:3], jnp.float32)
    assert (dq.shape, dq.dtype) == (q.shape, jnp.bfloat16)
    public = jax.eval_shape(lambda q, k: jax.nn.dot_product_attention(q, k, k, implementation="cudnn",
                                                                      return_residual=True)[1], q, k)
    assert public.dtype == jnp.bfloat16, "jax's public binding now returns an fp32 LSE: the private path may go"


def test_private_cudnn_packed_backward_binding_still_fits():
    """The packed split's cuDNN backward binds the same primitive with sequence-packing operands (query and
    key lengths [b, runs], offsets [b, runs + 1]); its abstract evaluation still takes them. The merged LSE
    goes in as cuDNN's packed softmax stats, [b * runs, heads, t] with the g-th used run's queries at
    [g, :, :length]: scattered there and gathered back, every query in a run keeps its own LSE."""
    from mtp_jax.mtp.cudnn_private import _stats_index, cudnn_packed_part_dq

    q_len = jnp.array([[3, 2, -1], [-1, 4, -1]], jnp.int32)
    q_off = jnp.array([[0, 5, -1], [-1, 1, -1]], jnp.int32)
    runs = (q_len, q_off, q_len, q_off, jnp.zeros(2, bool))
    q = jax.ShapeDtypeStruct((2, 8, 4, 64), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((2, 8, 4), jnp.float32)
    for causal in (False, True):
        dq = jax.eval_shape(lambda q, lse: cudnn_packed_part_dq(q, q, q, runs, causal, q, lse, q), q, lse)
        assert (dq.shape, dq.dtype) == (q.shape, jnp.float32)
    g, place, has = _stats_index(q_len, q_off, 8)
    assert has.tolist() == [[1, 1, 1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    assert g[has].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2] and place[has].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    lse_v = jax.random.normal(jax.random.key(0), (2, 8, 4))
    stats = jnp.zeros((6, 4, 8)).at[g, :, place].set(lse_v, mode="drop")
    back = jnp.where(has[..., None], stats[g, :, place], 0.0)
    assert jnp.array_equal(back, jnp.where(has[..., None], lse_v, 0.0))
