"""The decoding layouts compute the training layout's function (A in the base kernels, `DecodeLayer`; the
adapters merged into second kernels, `MergedDecodeLayer`), and read each weight in place: the compiled
decoding program holds no slice or copy of a weight matrix, where the stacked (scanned) training layout
slices one per layer per call."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.decoding import layout, speculative
from mtp_jax.decoding.cache import init_cache
from mtp_jax.decoding.layout import (adapters_into_base, is_prepared, layout_name, merge_adapters, plain_of,
                                    prepare)
from mtp_jax.decoding.model import DecodeLayer, MergedDecodeLayer
from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.decoding.speculative import speculative_generate
from mtp_jax.models import LoRAConfig
from mtp_jax.models.llama import CausalLM
from mtp_jax.models.lora import fuse_adapters
from test_decoding_speculative import K, tiny_mtp
from test_lora import random_lora, tiny  # noqa: F401 (tiny: a fixture)

B, PROMPT, SLOTS = 2, 16, 64


@pytest.mark.parametrize("settings", [{}, {"rslora": True}, {"rslora": True, "bias": True},
                                      {"targets": ("q", "v", "up", "down")}],
                         ids=["plain", "rslora", "rslora_bias", "some_targets"])
def test_adapters_in_base_kernels_compute_the_same_function(tiny, settings):
    """adapters_into_base + DecodeLayer, from the unfused or the fused adapters: the training layer's
    function, with no `lora_A` left and the A columns in the kernels that read their inputs."""
    config, base = tiny
    cfg = LoRAConfig(rank=3, alpha=6.0, **settings)
    unfused = CausalLM(config, cfg)
    lora = random_lora(unfused)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))
    gate = jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, 9)).astype(np.float32))
    h1, _ = unfused.apply({"params": base, "lora": lora}, tokens, gate=gate)
    plain, _ = CausalLM(config).apply({"params": base}, tokens)
    assert np.abs(np.asarray(h1) - np.asarray(plain)).max() > 1e-3, "adapters had no effect: test is vacuous"
    fused_cfg, fused_lora = fuse_adapters(cfg, lora)
    for source_cfg, source_lora in ((cfg, lora), (fused_cfg, fused_lora)):
        dec_base, dec_lora = adapters_into_base(base, source_lora)
        assert adapters_into_base(dec_base, dec_lora)[0] is dec_base
        assert "lora_A" not in str(jax.tree_util.tree_structure(dec_lora)), "A left in the lora collection"
        decoding = CausalLM(config, source_cfg, layer=DecodeLayer)
        h3, _ = decoding.apply({"params": dec_base, "lora": dec_lora}, tokens, gate=gate)
        np.testing.assert_allclose(np.asarray(h3), np.asarray(h1), atol=2e-5,
                                   err_msg=f"decoding layout from the {'fused' if source_cfg.fuse else 'unfused'} one")
        off, _ = decoding.apply({"params": dec_base, "lora": dec_lora}, tokens)
        np.testing.assert_allclose(np.asarray(off), np.asarray(plain), atol=2e-5, err_msg="gate off: the base model")
        widened = dec_base["model"]["layers"]["self_attn"]["o_proj"]["kernel"].shape[-1] - config.hidden_size
        assert widened == (cfg.rank if cfg.active("o") else 0), f"o_proj carries {widened} A columns"

        # the merged layout: [W | s A B] per adapted projection, no adapter matmul
        if cfg.bias:
            with pytest.raises(ValueError, match="bias"):
                merge_adapters(source_cfg, base, source_lora)
            continue
        merged_base = merge_adapters(source_cfg, base, source_lora)
        merged = CausalLM(config, dataclasses.replace(source_cfg, fuse=False), layer=MergedDecodeLayer)
        h4, _ = merged.apply({"params": merged_base, "lora": {}}, tokens, gate=gate)
        np.testing.assert_allclose(np.asarray(h4), np.asarray(h1), atol=2e-5, err_msg="merged layout")
        off, _ = merged.apply({"params": merged_base, "lora": {}}, tokens)
        np.testing.assert_allclose(np.asarray(off), np.asarray(plain), atol=2e-5, err_msg="merged, gate off")
        for block, proj, width in (("self_attn", "o_proj", config.hidden_size),
                                   ("mlp", "gate_proj", config.intermediate_size)):
            got = merged_base["model"]["layers"][block][proj]["kernel"].shape[-1]
            assert got == (2 * width if cfg.active(proj.removesuffix("_proj")) else width), f"merged {proj}: {got}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_mtp("llama", 16, tmp_path_factory.mktemp("llama"))


def weight_copies(hlo: str, params) -> list[tuple[str, tuple]]:
    """(op, shape) of every slice, dynamic-slice or copy in `hlo` whose result is a per-layer weight
    matrix of `params` (leading unit axes dropped: a scan slices [1, in, out] out of [layers, in, out])."""
    shapes = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim == 2}
    shapes -= {params["base"]["model"]["embed_tokens"]["embedding"].shape}  # read by a gather, not a slice
    found = []
    for shape, op in re.findall(r"= \w+\[([\d,]*)\]\S* (dynamic-slice|slice|copy)\(", hlo):
        dims = tuple(int(d) for d in shape.split(",") if d)
        while dims and dims[0] == 1:
            dims = dims[1:]
        if dims in shapes:
            found.append((op, dims))
    return found


def forward_hlo(model, params, cache) -> str:
    f = jax.jit(speculative._forward, static_argnames=("model", "anchors", "k"))
    return f.lower(model, params, cache, jnp.full((B,), 20, jnp.int32), jnp.zeros((B,), jnp.int32),
                   jnp.ones((B, SLOTS), bool), jnp.zeros((B, K + 1), jnp.int32), anchors=tuple(range(K + 1)),
                   k=K).compile().as_text()


def test_decoding_programs_read_weights_in_place(setup):
    model, params, _ = setup
    dec_model, dec_params = prepare(model, params)
    assert is_prepared(dec_model) and prepare(dec_model, dec_params)[1] is dec_params
    per_layer = init_cache(model.config, B, SLOTS, model.dtype)
    assert weight_copies(forward_hlo(dec_model, dec_params, per_layer), dec_params) == [], "one call's forward"
    whole = speculative._decode.lower(
        dec_model, dec_params, jnp.zeros((B, PROMPT), jnp.int32), jnp.zeros((B,), jnp.int32),
        jnp.asarray([10_000]), jax.random.key(0), jnp.asarray(True), 8, Sampling(), K, tuple(range(K + 1)), None,
        False).compile().as_text()
    assert weight_copies(whole, dec_params) == [], "the whole decoding program (prompt call + step loop)"

    # positive control: the same adapters, fused and folded, but stacked under the scan (the old layout)
    cfg, lora = fuse_adapters(model.lora, params["lora"])
    base, lora = adapters_into_base(params["base"], lora)
    stacked_cache = tuple(jnp.stack(x) for x in zip(*per_layer))  # (k, v), each [layers, ...]
    copies = weight_copies(forward_hlo(model.clone(lora=cfg, layer=DecodeLayer), {**params, "base": base, "lora": lora},
                                       stacked_cache), dec_params)
    assert len(copies) >= 7, f"the scanned layout should slice every layer weight, found {copies}"


def test_plain_of_prepared_params_is_the_base_model(setup):
    """The plain baseline from an MTPModel's prepared params (what `load_adapter` returns, A columns in the
    base kernels) is the base model itself: the same per-layer kernels and the same greedy tokens as from
    the unprepared base."""
    model, params, _ = setup
    ref_model, ref_params = prepare(CausalLM(model.config, None, model.dtype, model.param_dtype), params["base"])
    dec_model, dec_params = prepare(model, params)
    widened = dec_params["base"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].shape[-1]
    assert widened > model.config.q_features, "the prepared q_proj carries no A columns: test is vacuous"
    lm, base = plain_of(dec_model, dec_params)
    assert jax.tree.map(jnp.shape, base) == jax.tree.map(jnp.shape, ref_params)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(ref_params)))
    prompts = [[3, 5, 7, 9], [11, 2]]
    assert generate(lm, base, prompts, 6, [-1]) == generate(ref_model, ref_params, prompts, 6, [-1])
    assert plain_of(model, params)[1] is not None  # unprepared params work too


def test_merged_layout_decodes_as_plain_greedy_with_the_same_drafts(setup):
    """prepare(merged=True): speculative greedy output is plain greedy output, the drafts those of the
    A-columns layout (float32: x (s A B) and (x A)(s B) agree far below any argmax gap here), and the
    plain baseline cut from its params is the base model."""
    model, params, lm = setup
    prompts = [[3, 5, 7, 9], [11, 2, 4]]
    free = generate(lm, params["base"], prompts, 12, [-1])
    merged_model, merged_params = prepare(model, params, merged=True)
    assert is_prepared(merged_model) and merged_model.layer is MergedDecodeLayer and merged_params["lora"] == {}
    assert prepare(merged_model, merged_params)[1] is merged_params  # the decoders' own prepare: a no-op
    with pytest.raises(ValueError, match="already in the A-columns"):
        prepare(*prepare(model, params), merged=True)
    res = speculative_generate(merged_model, merged_params, prompts, 12, [-1])
    ref = speculative_generate(*prepare(model, params), prompts, 12, [-1])
    assert res.tokens == free
    np.testing.assert_array_equal(res.steps, ref.steps)
    np.testing.assert_array_equal(res.accepted, ref.accepted)
    assert res.accepted.sum() > 0, "no draft accepted: the drafts are not compared"
    assert generate(*plain_of(merged_model, merged_params), prompts, 12, [-1]) == free


def test_prepare_picks_the_merged_layout_for_small_bases(setup, monkeypatch):
    """merged=None: merged for a base of at most SMALL_BASE_PARAMS parameters, A columns above; the
    A-columns layout is prepare's default and is kept for a model already prepared."""
    model, params, _ = setup
    n = sum(x.size for x in jax.tree.leaves(params["base"]))
    assert layout_name(model) == "training" and layout_name(prepare(model, params)[0]) == "A columns"
    monkeypatch.setattr(layout, "SMALL_BASE_PARAMS", n)
    assert layout_name(prepare(model, params, merged=None)[0]) == "merged"
    monkeypatch.setattr(layout, "SMALL_BASE_PARAMS", n - 1)
    assert layout_name(prepare(model, params, merged=None)[0]) == "A columns"
    assert layout_name(prepare(*prepare(model, params), merged=None)[0]) == "A columns"
