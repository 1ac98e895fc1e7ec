"""The sampler head (SPEC §4): turns a mask token's hidden state and the previous draft into logits.

Input concat(E[prev], h) [.., 2d]; block1 = RMSNorm(SiLU(Linear(2d -> d))), block2 =
RMSNorm(SiLU(Linear(d -> d)))(block1); output block1 + block2, fed to the frozen lm_head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.models.llama import RMSNorm
from mtp_jax.models.lora import Linear


class SamplerHead(nn.Module):
    hidden_size: int
    rms_norm_eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, prev_embedding: jax.Array, hidden: jax.Array) -> jax.Array:
        x = jnp.concatenate([prev_embedding.astype(self.dtype), hidden.astype(self.dtype)], axis=-1)
        block1 = Linear(self.hidden_size, ("sampler_in", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc1")(x)
        block1 = RMSNorm(self.rms_norm_eps, self.dtype, self.param_dtype, name="norm1")(nn.silu(block1))
        block2 = Linear(self.hidden_size, ("embed", "embed_out"), dtype=self.dtype, param_dtype=self.param_dtype,
                        name="fc2")(block1)
        block2 = RMSNorm(self.rms_norm_eps, self.dtype, self.param_dtype, name="norm2")(nn.silu(block2))
        return block1 + block2
