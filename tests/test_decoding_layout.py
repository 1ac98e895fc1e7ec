"""The decoding layout reads each weight in place: the compiled decoding program holds no slice or
copy of a weight matrix, where the stacked (scanned) training layout slices one per layer per call."""

import re

import jax
import jax.numpy as jnp
import pytest

from mtp_jax.decoding import speculative
from mtp_jax.decoding.cache import init_cache
from mtp_jax.decoding.layout import is_prepared, prepare
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.models.lora import adapters_into_base, fuse_adapters
from test_decoding_speculative import K, tiny_mtp

B, PROMPT, SLOTS = 2, 16, 64


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
    cfg, base, lora = adapters_into_base(cfg, params["base"], lora)
    stacked_cache = tuple(jnp.stack(x) for x in zip(*per_layer))  # (k, v), each [layers, ...]
    copies = weight_copies(forward_hlo(model.clone(lora=cfg), {**params, "base": base, "lora": lora}, stacked_cache),
                           dec_params)
    assert len(copies) >= 7, f"the scanned layout should slice every layer weight, found {copies}"
