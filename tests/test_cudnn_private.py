"""The private cuDNN binding (mtp_jax/mtp/cudnn_private.py) still fits the installed jax."""

import jax
import jax.numpy as jnp

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
