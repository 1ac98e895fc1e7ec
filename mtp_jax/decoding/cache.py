"""The KV cache: one (k, v) buffer pair per decoder layer, and the attention that writes a call's
keys/values into it and reads it.

Per-layer buffers (a tuple over layers, each [batch, slots, kv_heads, head_dim]) let a layer update
its own cache in place: no slice out of, and no write back into, a stacked [layers, ...] array. The
decoders run over unstacked layers (`layout.prepare`), whose `layer_state` / `aux` are such tuples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.models.config import ModelConfig

Cache = tuple[tuple[jax.Array, jax.Array], ...]


def init_cache(config: ModelConfig, batch: int, slots: int, dtype) -> Cache:
    """Empty cache: per layer (k, v), each [batch, slots, kv_heads, head_dim] in `dtype`."""
    shape = (batch, slots, config.num_kv_heads, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def cache_attend(index: jax.Array, slot_valid: jax.Array):
    """Attention over a KV cache; `layer_state` = this layer's (k, v) [batch, slots, kv_heads, head_dim].

    The new keys/values are written at slots [index, index + T); query t sits at slot index + t and
    sees valid slots <= its own. `slot_valid` [batch, slots] hides left padding. aux = the
    updated (k, v) of the layer.
    """

    def attend(q, k, v, layer_state):
        k_cache, v_cache = layer_state
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        slots = jnp.arange(k_cache.shape[1])
        q_slots = index + jnp.arange(q.shape[1])
        mask = (slots[None, :] <= q_slots[:, None])[None, None] & slot_valid[:, None, None, :]
        out = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask)
        return out, (k_cache, v_cache)

    return attend


def spec_attend(length: jax.Array, slot_valid: jax.Array, n_regular: int, mask_anchor: np.ndarray,
                mask_step: np.ndarray):
    """Attention for one speculative call: regular queries over the cache, mask blocks over cache + own block.

    `layer_state` = this layer's cache (k, v) [batch, slots, kv_heads, head_dim]. All R + M keys/values
    of the call are written to it at slots [length, length + R + M) per row (aux = the updated cache),
    so attention reads the cache alone, with no copy of it joined to the mask keys. Regular query i
    sees valid slots <= length + i; mask (s, j) sees valid slots <= length + s and the slots of masks
    (s, 1..j). The masks' slots lie past every slot a regular query sees, and the next call's write
    (at a length at most R further on) covers them again, so only regular tokens stay in the cache.
    A slot a query does not see adds an exact zero to its softmax sums (its weight underflows to 0),
    so what lies there never changes a result.
    """
    q_last = np.concatenate([np.arange(n_regular), mask_anchor])  # last cache slot each query sees, minus length
    # each mask sees the slots of its block's masks up to itself: [block start, own index] after the R regular
    m = np.arange(len(mask_anchor))
    block_start = m - (mask_step - 1)
    own_lo = np.concatenate([np.full(n_regular, 1), n_regular + block_start])  # regular queries: empty range
    own_hi = np.concatenate([np.zeros(n_regular, int), n_regular + m])
    write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))

    def attend(q, k, v, layer_state):
        k_cache, v_cache = layer_state
        k_cache = write(k_cache, k.astype(k_cache.dtype), length)
        v_cache = write(v_cache, v.astype(v_cache.dtype), length)
        rel = jnp.arange(k_cache.shape[1])[None, None, :] - length[:, None, None]  # [b, 1, slots]
        sees_cache = (rel <= q_last[None, :, None]) & slot_valid[:, None]
        sees_own = (rel >= own_lo[None, :, None]) & (rel <= own_hi[None, :, None])
        mask = (sees_cache | sees_own)[:, None]
        out = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask)
        return out, (k_cache, v_cache)

    return attend
