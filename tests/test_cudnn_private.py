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
