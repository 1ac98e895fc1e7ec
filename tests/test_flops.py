"""SPEC §11 FLOP accounting against a brute-force count over the naive interleaved sequence."""

import numpy as np

from mtp_jax.flops import step_flops
from mtp_jax.models.config import ModelConfig
from mtp_jax.mtp.layout import interleave


def test_step_flops_counts_the_interleaved_attention():
    k, mask_id = 3, 99
    config = ModelConfig(model_type="llama", vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-6,
                         max_position_embeddings=128, tie_word_embeddings=True, qk_norm=False)
    examples = [(7, 3), (5, 2), (4, 1)]  # (length, prompt length), packed into one row of 20 with padding
    length = 20
    seg, pos, resp = (np.zeros((1, length), np.int32) for _ in range(3))
    start, expected_keys, expected_pairs = 0, 0, 0
    for i, (n, prompt) in enumerate(examples):
        seg[0, start:start + n] = i + 1
        pos[0, start:start + n] = np.arange(n)
        resp[0, start + prompt:start + n] = 1
        lay = interleave(np.arange(n), prompt, k, mask_id)
        a, j = lay.regular_index, lay.step
        rows = (j == 0) | (a + j < n)  # regular tokens and the masks whose target a+j exists
        expected_keys += int(lay.attention[rows].sum())
        expected_pairs += int(((j > 0) & rows).sum())
        start += n
    got = step_flops(config, 1000, {"segment_ids": seg, "positions": pos, "response_mask": resp}, k)
    tokens = sum(n for n, _ in examples)
    assert got["tokens"] == tokens and got["pairs"] == expected_pairs
    per_key = 4 * config.num_layers * config.num_heads * config.head_dim
    regular_keys = sum(n * (n + 1) // 2 for n, _ in examples)
    mask_keys = expected_keys - regular_keys
    assert got["attention_flops"] == per_key * (regular_keys + 2 * mask_keys)
    assert got["flops"] == 2 * 1000 * tokens + 4 * 1000 * expected_pairs + got["attention_flops"]
