"""Exact mode (SPEC §10): in bf16, speculative greedy output equals exact plain greedy output bit for
bit, because both run one compiled call program and each row's reductions depend only on the row;
plain decoding in its own (one-row) calls rounds differently. And the divergence report: the first
differing token and the plain decoder's top-2 margin there, judged by `near_tie`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.decoding import plain, speculative
from mtp_jax.decoding.exactness import NEAR_TIE_ULPS, divergence, near_tie
from mtp_jax.decoding.layout import prepare
from test_decoding_speculative import NEVER, prompts_for, tiny_mtp

NEW = 24


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_mtp("llama", 16, tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("merged", [False, True], ids=["a_columns", "merged"])
def test_bf16_speculative_equals_exact_plain_bit_for_bit(llama, merged):
    model, params, lm = llama
    bf16 = jnp.bfloat16
    model, lm = model.clone(dtype=bf16), lm.clone(dtype=bf16)
    params = {**params, "base": jax.tree.map(lambda x: x.astype(bf16), params["base"])}
    base = params["base"]
    model, params = prepare(model, params, merged=merged)  # either decoding layout
    prompts = prompts_for(16)
    spec = speculative.decode(model, params, prompts, NEW, NEVER, keep_logits=True, exact=True)
    tokens, logits = plain.generate_with_logits(model, params, prompts, NEW, NEVER, exact=True)
    assert spec.accepted.sum() > 0, "no draft accepted: no token was verified in a row other than the first"
    assert spec.tokens == tokens, "exact mode: speculative tokens differ from exact plain greedy"
    for row, (a, b) in enumerate(zip(spec.logits, logits)):
        assert a.shape == b.shape == (NEW, 16)
        assert np.array_equal(a, b), f"row {row}: verifying logits not bitwise equal to exact plain decoding's"
    # positive control: plain decoding in one-row calls (not exact mode) rounds some logits differently
    own_tokens, own_logits = plain.generate_with_logits(lm, base, prompts, NEW, NEVER)
    same = [np.array_equal(a[:n], b[:n]) for a, b, n in
            zip(spec.logits, own_logits, (next((i for i, (x, y) in enumerate(zip(s, o)) if x != y), NEW)
                                          for s, o in zip(spec.tokens, own_tokens)))]
    assert not all(same), "one-row plain calls gave the same bits: the comparison above shows nothing"


def test_exact_plain_is_plain_greedy_in_float32(llama):
    """speculate=False emits the base model's own next token: fp32 output is plain greedy decoding's."""
    model, params, lm = llama
    prompts = prompts_for(16)
    res = speculative.decode(model, params, prompts, NEW, NEVER, speculate=False)
    assert res.tokens == plain.generate(lm, params["base"], prompts, NEW, NEVER)
    assert res.offered.sum() == 0 and (res.steps == NEW).all(), "one call per token, no draft offered"
    with pytest.raises(TypeError, match="MTPModel"):
        plain.generate(lm, params["base"], prompts, NEW, NEVER, exact=True)
    with pytest.raises(ValueError, match="lossy"):
        speculative.speculative_generate(model, params, prompts, NEW, NEVER, lossy=0.5, exact=True)


def test_divergence_reports_index_and_plain_margin(llama):
    model, params, lm = llama
    prompt = prompts_for(16)[1]
    tokens, logits = plain.generate_with_logits(lm, params["base"], [prompt], NEW, NEVER)
    tokens, logits = tokens[0], logits[0]
    other = list(tokens)
    other[7] = (other[7] + 1) % 16
    d = divergence(lm, params["base"], prompt, tokens, other)
    top2 = np.sort(logits[7])[-2:]
    assert (d.index, d.plain_token, d.other_token) == (7, tokens[7], other[7])
    np.testing.assert_allclose(d.margin, top2[1] - top2[0], atol=1e-4, err_msg="margin: teacher-forced vs decoder")
    assert d.near_tie == near_tie(d.margin, top2, jnp.float32)
    assert divergence(lm, params["base"], prompt, tokens, tokens[:10]) is None, "a prefix is no divergence"


@pytest.mark.parametrize("margin,top,dtype,tie", [
    (0.25, 10.0, jnp.bfloat16, True),  # bf16 ulp at 8..16 is 2**-7 * 8 = 0.0625: 4 ulps
    (0.26, 10.0, jnp.bfloat16, False),
    (0.25, 1.5, jnp.bfloat16, False),  # ulp at 1..2 is 2**-7: 4 ulps = 0.03125
    (1.9, 100.0, jnp.bfloat16, True),  # ulp at 64..128 is 0.5
    (0.25, 10.0, jnp.float32, False),  # float32: 4 ulps at 10 is about 4e-6
    (3e-6, 10.0, jnp.float32, True),
])
def test_near_tie_is_a_few_ulps_at_the_logits_magnitude(margin, top, dtype, tie):
    assert NEAR_TIE_ULPS == 4.0
    assert near_tie(margin, np.array([top - margin, top]), dtype) == tie
