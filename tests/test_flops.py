"""SPEC §11 FLOP accounting against a brute-force count over the naive interleaved sequence."""

import jax
import numpy as np
import pytest

from conftest import TINY_LLAMA, TINY_QWEN3
from mtp_jax.flops import matmul_params, step_flops
from mtp_jax.models.config import ModelConfig
from mtp_jax.models.llama import CausalLM
from mtp_jax.models.loading import abstract_params
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
    got = step_flops(config, {"segment_ids": seg, "positions": pos, "response_mask": resp}, k)
    p = matmul_params(config)
    tokens = sum(n for n, _ in examples)
    assert got["tokens"] == tokens and got["pairs"] == expected_pairs
    per_key = 4 * config.num_layers * config.num_heads * config.head_dim
    regular_keys = sum(n * (n + 1) // 2 for n, _ in examples)
    mask_keys = expected_keys - regular_keys
    assert got["attention_flops"] == per_key * (regular_keys + 2 * mask_keys)
    assert got["flops"] == 2 * p * tokens + 4 * p * expected_pairs + got["attention_flops"]


@pytest.mark.parametrize("kind, hf", [("llama", TINY_LLAMA), ("qwen3", TINY_QWEN3)])
def test_matmul_params_leave_out_the_input_embedding(kind, hf):
    """P counts the model's kernels plus one vocabulary matrix, the lm_head: an untied model's embedding
    table is a lookup and a tied one's serves once, as the lm_head (Llama untied, Qwen3 tied)."""
    config = ModelConfig.from_hf({**hf, "model_type": kind})
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(CausalLM(config)))[0]
    size = lambda leaf: int(np.prod(getattr(leaf, "value", leaf).shape))
    kernels = sum(size(leaf) for path, leaf in leaves if "kernel" in jax.tree_util.keystr(path))
    head = 0 if "lm_head" in str(leaves) else config.vocab_size * config.hidden_size  # tied: the table, once
    assert matmul_params(config) == kernels + head, (kind, matmul_params(config), kernels + head)
