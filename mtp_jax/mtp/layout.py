"""Mask layout (SPEC §2): which (anchor, draft step) pairs exist, where their masks sit, and
the interleaved sequence the naive oracle runs.

The two-stream path never builds the interleaved sequence: every regular position a is a
candidate anchor with k masks at position ids positions[a] + j, and `pair_valid` says which
pairs train. A batch is the data pipeline's dict: tokens, positions, segment_ids (0 = pad),
response_mask (anchors), each [batch, length].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


def pair_valid(segment_ids: jnp.ndarray, response_mask: jnp.ndarray, k: int, xp=jnp) -> jnp.ndarray:
    """[batch, length, k] bool: anchor a is a response token and a+j is a regular token of its example.

    xp=np computes it on the host (FLOP counting) without a device round trip."""
    b, length = segment_ids.shape
    padded = xp.concatenate([segment_ids, xp.zeros((b, k), segment_ids.dtype)], axis=1)
    ahead = xp.stack([padded[:, j: j + length] for j in range(1, k + 1)], axis=-1)  # segment of a+j
    anchor = (response_mask & (segment_ids > 0))[..., None]
    return anchor & (ahead == segment_ids[..., None])


@dataclasses.dataclass(frozen=True)
class Interleaved:
    """One example laid out as SPEC §2's single sequence (oracle only)."""

    tokens: np.ndarray  # [T] regular ids, mask_id at masks
    positions: np.ndarray  # [T]
    gate: np.ndarray  # [T] 1.0 at masks
    attention: np.ndarray  # [T, T] bool, query x key
    regular_index: np.ndarray  # [T] regular position of each token (its anchor for a mask), -1 none
    step: np.ndarray  # [T] draft step j for masks, 0 for regular tokens


def interleave(tokens: np.ndarray, prompt_len: int, k: int, mask_id: int) -> Interleaved:
    """`[prompt][y_0 m..m][y_1 m..m]..` with MTP-GLoRA's block mask, except that a mask is a mask."""
    ids, pos, gate, reg, step = [], [], [], [], []
    for a, tok in enumerate(tokens):
        ids.append(int(tok)); pos.append(a); gate.append(0.0); reg.append(a); step.append(0)
        if a >= prompt_len:
            for j in range(1, k + 1):
                ids.append(mask_id); pos.append(a + j); gate.append(1.0); reg.append(a); step.append(j)
    reg_a, step_a = np.asarray(reg), np.asarray(step)
    is_mask = step_a > 0
    q_reg, k_reg = reg_a[:, None], reg_a[None, :]
    regular_keys = ~is_mask[None, :] & (k_reg <= q_reg)  # regular keys up to the query's (anchor) position
    own_block = is_mask[:, None] & is_mask[None, :] & (k_reg == q_reg) & (step_a[None, :] <= step_a[:, None])
    attention = regular_keys | own_block
    return Interleaved(np.asarray(ids, np.int32), np.asarray(pos, np.int32), np.asarray(gate, np.float32),
                       attention, reg_a, step_a)
