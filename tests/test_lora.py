"""Gated LoRA: fused == unfused, rslora scaling, B = 0 is the base model, gate 0 is exact; MTP bad inputs.
(The decoding layout of the adapters: tests/test_decoding_layout.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_hf_model, save_hf
from mtp_jax.models import LoRAConfig, load_model
from mtp_jax.models.llama import CausalLM
from mtp_jax.models.lora import Linear, fuse_adapters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_hf(make_hf_model("qwen3", seed=4), tmp_path_factory.mktemp("q"))
    _, base, config = load_model(path)
    return config, base


def random_lora(model, seed=0):
    tokens = jnp.zeros((1, 3), jnp.int32)
    lora = model.init(jax.random.key(seed), tokens, gate=1.0)["lora"]
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, lora, is_leaf=lambda b: hasattr(b, "value")))


@pytest.mark.parametrize("settings", [{}, {"rslora": True, "bias": True}, {"targets": ("q", "v", "up", "down")}],
                         ids=["plain", "rslora_bias", "some_targets"])
def test_fused_equals_unfused(tiny, settings):
    """fuse_adapters turns trained unfused adapters into fused ones that compute the same function."""
    config, base = tiny
    cfg = LoRAConfig(rank=3, alpha=6.0, **settings)
    unfused = CausalLM(config, cfg)
    lora = random_lora(unfused)
    fused_cfg, fused_lora = fuse_adapters(cfg, lora)
    assert fused_cfg.fuse and fuse_adapters(fused_cfg, fused_lora)[1] is fused_lora
    fused = CausalLM(config, fused_cfg)
    assert jax.tree.map(jnp.shape, fused_lora) == jax.tree.map(jnp.shape, random_lora(fused)), "not the fused layout"
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))
    gate = jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, 9)).astype(np.float32))
    h1, _ = unfused.apply({"params": base, "lora": lora}, tokens, gate=gate)
    h2, _ = fused.apply({"params": base, "lora": fused_lora}, tokens, gate=gate)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), atol=2e-5)
    plain, _ = CausalLM(config).apply({"params": base}, tokens)
    assert np.abs(np.asarray(h1) - np.asarray(plain)).max() > 1e-3, "adapters had no effect: test is vacuous"


def test_fused_tree_shapes():
    cfg = LoRAConfig(rank=4, alpha=8.0, fuse=True)
    assert cfg.scale(3) == LoRAConfig(rank=4, alpha=8.0).scale(1), "fused rank 3r / alpha 3a keeps s"


def test_rslora_scaling():
    x = jax.random.normal(jax.random.key(0), (5, 16))
    outs = {}
    for rs in (False, True):
        layer = Linear(8, ("embed", "mlp"), lora=LoRAConfig(rank=4, alpha=8.0, rslora=rs))
        v = layer.init(jax.random.key(1), x, gate=1.0)
        lora = jax.tree.map(lambda p: p + 0.1, v["lora"])  # B != 0
        outs[rs] = layer.apply({"params": v["params"], "lora": lora}, x, gate=1.0) - layer.apply(
            {"params": v["params"]}, x)
    # s = alpha/r = 2 vs alpha/sqrt(r) = 4
    np.testing.assert_allclose(np.asarray(outs[True]), 2.0 * np.asarray(outs[False]), rtol=1e-5)


def test_b_zero_init_is_base_model_and_gate_zero_is_exact(tiny):
    config, base = tiny
    lm = CausalLM(config, LoRAConfig(rank=4, alpha=8.0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (1, 7)))
    init_lora = lm.init(jax.random.key(0), tokens, gate=1.0)["lora"]
    plain, _ = CausalLM(config).apply({"params": base}, tokens)
    fresh, _ = lm.apply({"params": base, "lora": init_lora}, tokens, gate=1.0)
    np.testing.assert_array_equal(np.asarray(fresh), np.asarray(plain))
    trained = random_lora(lm)
    off, _ = lm.apply({"params": base, "lora": trained}, tokens, gate=jnp.zeros((1, 7)))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


def test_only_adapters_get_gradients(tiny):
    config, base = tiny
    lm = CausalLM(config, LoRAConfig(rank=2, alpha=4.0))
    tokens = jnp.asarray([[3, 4, 5, 6]])
    lora = random_lora(lm)
    gate = jnp.asarray([[0.0, 1.0, 0.0, 1.0]])

    def loss(params, lora):
        h, _ = lm.apply({"params": params, "lora": lora}, tokens, gate=gate)
        return jnp.sum(h ** 2)

    g_base, g_lora = jax.grad(loss, argnums=(0, 1))(base, lora)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_lora)), "an adapter got no gradient"
    # the optimizer only ever sees adapters; this shows the base tree is separate and intact
    assert set(jax.tree_util.tree_structure(g_base).node_data()[1]) == set(base)


def test_bad_k():
    from mtp_jax.mtp.model import MTPConfig

    with pytest.raises(ValueError, match=r"draft_length \(k\) must be >= 1, got 0"):
        MTPConfig(draft_length=0)


def test_tokenizer_that_already_has_mask(smollm2_dir):
    from transformers import AutoTokenizer

    from mtp_jax.mtp.mask_token import MaskTokenError, add_mask_token

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    n = len(tok)
    mask_id = add_mask_token(tok, 49152)
    assert mask_id == n and tok.convert_ids_to_tokens(mask_id) == "<mask>"
    assert tok("a <mask> b")["input_ids"].count(mask_id) == 1, "<mask> is not a special token"
    with pytest.raises(MaskTokenError, match=r"already has '<mask>' \(id \d+\).*mtp.mask_token"):
        add_mask_token(tok, 49152)
