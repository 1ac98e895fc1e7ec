"""How a decoder picks a token from logits: greedy, or sampled under temperature / top-k / top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Float32 logits [..., vocab] of the distribution `sampling` draws from: scaled by the
    temperature, with tokens outside top-k / the top-p nucleus at -inf (temperature > 0 only)."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # smallest logit still inside the nucleus (the top token always is)
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < sampling.top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[..., None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_token(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [..., vocab] -> token ids [...]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)
