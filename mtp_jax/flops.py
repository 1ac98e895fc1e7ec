"""FLOP accounting for MFU (SPEC §11), shared by the training CLI and the benchmarks.

P = the base model's weight matrices (`matmul_params`): every projection and the lm_head, not the
input embedding table, which is a lookup (a tied table counts once, as the lm_head). Regular stream: forward only, 2P per regular token. Mask stream: forward
plus input-gradient backward, 4P per valid (anchor, step) pair. Attention adds, per layer, 4 * heads *
head_dim FLOPs per (query, key) pair it scores (QK^T and PV): a regular token at position p of its
example scores p + 1 keys; the mask m_{a,j} scores the a + 1 regular keys of its prefix and the j
masks of its block, forward and input-gradient backward (twice the forward, like the 4P).
MFU = counted FLOPs / (time x device peak dense bf16).
"""

from __future__ import annotations

import numpy as np

from mtp_jax.models.config import ModelConfig
from mtp_jax.mtp.layout import pair_valid

# dense bf16 peak per device (no sparsity)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def device_peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def matmul_params(config: ModelConfig) -> int:
    """P of SPEC §11: the entries of the weight matrices a token's forward multiplies by. Per layer q, k, v,
    o, gate, up and down; then the lm_head. Norm weights and biases are not matrices."""
    d, head = config.hidden_size, config.head_dim
    attention = d * head * 2 * (config.num_heads + config.num_kv_heads)  # q and o; k and v
    mlp = 3 * d * config.intermediate_size
    return config.num_layers * (attention + mlp) + d * config.vocab_size


def step_flops(config: ModelConfig, batch: dict, k: int) -> dict:
    """Counted FLOPs of one MTP loss-and-grad step on a host batch (numpy: positions, segment_ids,
    response_mask). Returns regular tokens, valid pairs, and the FLOPs split into params / attention."""
    segment_ids = np.asarray(batch["segment_ids"])
    positions = np.asarray(batch["positions"]).astype(np.int64)
    regular = segment_ids > 0
    valid = pair_valid(segment_ids, np.asarray(batch["response_mask"]).astype(bool), k, xp=np)
    tokens, pairs = int(regular.sum()), int(valid.sum())
    regular_keys = int(((positions + 1) * regular).sum())
    mask_keys = int(((positions[..., None] + 1 + np.arange(1, k + 1)) * valid).sum())
    per_key = 4 * config.num_layers * config.num_heads * config.head_dim
    n_params = matmul_params(config)
    params = 2 * n_params * tokens + 4 * n_params * pairs
    attention = per_key * (regular_keys + 2 * mask_keys)
    return {"tokens": tokens, "pairs": pairs, "param_flops": float(params), "attention_flops": float(attention),
            "flops": float(params + attention)}
