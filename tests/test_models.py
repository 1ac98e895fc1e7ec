"""The Flax decoder is transformers' model: logits parity on tiny random configs and on SmolLM2."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_model, save_hf
from mtp_jax.models import load_model
from mtp_jax.models.loading import SafetensorsReader


def flax_logits(model, params, ids):
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids), method=model.forward_logits))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


def assert_logits_match(model, params, hf, ids, what: str):
    """The Flax model's logits equal transformers' within float32 noise."""
    diff = np.abs(flax_logits(model, params, ids) - torch_logits(hf, ids)).max()
    assert diff < 1e-4, f"{what}: max |logit diff| {diff}"


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_tiny_logits_match_transformers(kind, sharded, tmp_path):
    hf = make_hf_model(kind, seed=1)
    path = save_hf(hf, tmp_path / kind, sharded=sharded)
    if sharded:
        assert (path / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    model, params, config = load_model(path)
    assert config.qk_norm == (kind == "qwen3") and config.tie_word_embeddings == (kind == "qwen3")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 37))
    assert_logits_match(model, params, hf, ids, f"{kind} ({'sharded' if sharded else 'single'})")


def test_llama3_rope_scaling_is_applied(tiny_hf):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind, hf, path = tiny_hf
    model, _, config = load_model(path)
    if kind == "llama":
        assert config.rope_llama3 is not None
        # bit for bit against torch's scalar kernels: test_rope.py; its SIMD pow may differ in the last bits
        np.testing.assert_array_max_ulp(config.rope_inv_freq(), ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")[0], 2)
        plain = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim))
        assert not np.allclose(config.rope_inv_freq(), plain), "llama3 scaling left frequencies unchanged"
    else:
        assert config.rope_llama3 is None


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
     "truncate": False, "mscale": 0.7, "mscale_all_dim": 1.0},
], ids=["qwen3_defaults", "all_options"])
def test_yarn_rope_logits_match_transformers(rope, tmp_path):
    """Qwen3 beyond its pretraining context (YaRN): frequencies, attention factor and logits as transformers,
    at positions up to 3x the original context."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from conftest import TINY_QWEN3

    torch.manual_seed(3)
    hf = Qwen3ForCausalLM(Qwen3Config(**{**TINY_QWEN3, "rope_scaling": rope})).eval()
    model, params, config = load_model(save_hf(hf, tmp_path / "yarn"))
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf.config, "cpu")
    np.testing.assert_array_max_ulp(config.rope_inv_freq(), inv.numpy(), 2)  # bit for bit: test_rope.py
    assert config.rope_attention_scaling == pytest.approx(factor) and factor != 1.0
    plain = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim))
    assert not np.allclose(config.rope_inv_freq(), plain), "yarn left frequencies unchanged"
    ids = np.random.default_rng(4).integers(0, config.vocab_size, (1, 192))
    assert_logits_match(model, params, hf, ids, "yarn")


def test_padding_keys_are_hidden(tiny_hf):
    """A left-padded row gives the same logits as the unpadded row at real positions."""
    _, _, path = tiny_hf
    model, params, config = load_model(path)
    ids = np.random.default_rng(1).integers(3, config.vocab_size, (1, 20))
    pad = 7
    padded = np.concatenate([np.zeros((1, pad), np.int64), ids], axis=1)
    positions = np.maximum(np.arange(padded.shape[1]) - pad, 0)[None]
    valid = np.arange(padded.shape[1])[None] >= pad
    out = model.apply({"params": params}, jnp.asarray(padded), jnp.asarray(positions), jnp.asarray(valid),
                      method=model.forward_logits)
    ref = flax_logits(model, params, ids)
    np.testing.assert_allclose(np.asarray(out)[:, pad:], ref, atol=1e-5)


def test_bf16_compute_with_fp32_params(tiny_hf):
    _, hf, path = tiny_hf
    model, params, _ = load_model(path, dtype="bfloat16", param_dtype="float32")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (1, 16))
    out = flax_logits(model, params, ids).astype(np.float32)
    ref = torch_logits(hf, ids)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, f"bf16 compute drifted from fp32 reference: rel {rel}"


def test_smollm2_chat_prompt_top1_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a list."}],
                                  add_generation_prompt=True, return_dict=False)
    model, params, _ = load_model(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ours, ref = flax_logits(model, params, [ids]), torch_logits(hf, [ids])
    mismatch = np.nonzero(ours.argmax(-1) != ref.argmax(-1))[1]
    assert mismatch.size == 0, f"top-1 differs at positions {mismatch.tolist()}"
    assert np.abs(ours - ref).max() < 1e-3


def test_sharded_reader_reads_every_tensor_once(tmp_path):
    hf = make_hf_model("llama")
    path = save_hf(hf, tmp_path / "m", sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1, "checkpoint was not split into several shards"
    reader = SafetensorsReader(path)
    for name, tensor in hf.state_dict().items():
        np.testing.assert_array_equal(reader.get(name), tensor.numpy(), err_msg=name)


def test_unsupported_rope_type_is_named():
    from conftest import TINY_QWEN3
    from mtp_jax.models.config import ModelConfig, UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="rope type 'dynamic' is not supported; expected 'default', "
                                                    "'llama3' or 'yarn'"):
        ModelConfig.from_hf({**TINY_QWEN3, "model_type": "qwen3", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
