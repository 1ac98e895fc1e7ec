"""Speculative sampling draws from the base distribution over several verification steps (SPEC §10).

Many rows decode the same prompt at once; the empirical distribution of the token at each of the
first NEW positions must lie within a total-variation bound of the exact one: the plain model's
probabilities under the same temperature / top-k / top-p filter, summed over every continuation
the filter allows (enumerated in float64). A vocabulary of 5 keeps that enumeration small and, with
random adapters, gets drafts accepted in about half the steps, so the accept, reject and bonus paths
all shape each position. Deliberately broken verifiers (negative controls) must exceed the bound.

The bound: for each position, TV = max over token sets A of |P_hat(A) - P(A)|; Hoeffding's
inequality for each of the 2^(V-1) sets (A and its complement give the same gap) and a union bound over
sets and positions put TV above BOUND with probability at most DELTA if the sampler is exact.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtp_jax.decoding.speculative as decode_module
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.models.llama import CausalLM
from test_decoding_speculative import NEVER, tiny_mtp

VOCAB = 5
NEW = 8  # emitted tokens checked: k = 3, so at least 2 verification steps, usually 4 to 6
ROWS = 6000
DELTA = 1e-4
BOUND = float(np.sqrt(np.log(NEW * 2 ** (VOCAB - 1) / DELTA) / (2 * ROWS)))  # about 0.034
PROMPT = [3, 4, 2, 1, 0]
TOP_K = Sampling(1.0, top_k=3)
TOP_P = Sampling(1.0, top_p=0.8)


def speculative_sample(model, params, sampling, anchors, seed=0):
    """[ROWS, NEW] tokens from speculative sampling of PROMPT. The one call into the decoder's public API."""
    res = decode_module.speculative_generate(model, params, [PROMPT] * ROWS, NEW, NEVER, sampling=sampling,
                                             seed=seed, anchors=anchors)
    return np.array(res.tokens), res.acceptance


def filtered_probs(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """float64 [..., V] distribution of `sampling` (the definition, not the library's code): temperature,
    then the k largest logits, then the nucleus (the most likely tokens, in order, until their mass
    reaches top_p; a token is in if the mass before it is below top_p)."""
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = np.sort(logits, -1)[..., -sampling.top_k][..., None]
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-p, -1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep = np.zeros(p.shape, bool)
        np.put_along_axis(keep, order, np.cumsum(sorted_p, -1) - sorted_p < sampling.top_p, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


@functools.partial(jax.jit, static_argnums=0)
def _logits_at(lm, params, seqs, index):
    return lm.apply({"params": params}, seqs, method=CausalLM.forward_logits)[:, index]


def exact_marginals(lm, base_params, sampling: Sampling, max_prefixes: int = 1 << 14) -> np.ndarray:
    """[NEW, V]: the exact distribution of each emitted token, from the plain model's logits over every
    continuation of PROMPT the filter allows (level by level; prefixes padded to one length and a
    power-of-two count, so few compilations)."""
    length = len(PROMPT) + NEW - 1
    prefixes, weight, marginals = np.zeros((1, 0), np.int32), np.ones(1), []
    for i in range(NEW):
        bucket = max(256, 1 << int(np.ceil(np.log2(len(prefixes)))))
        assert len(prefixes) <= max_prefixes, f"{len(prefixes)} continuations at token {i}: filter too loose"
        seqs = np.zeros((bucket, length), np.int32)
        seqs[:len(prefixes), :len(PROMPT) + i] = np.concatenate([np.tile(PROMPT, (len(prefixes), 1)), prefixes], 1)
        logits = np.asarray(_logits_at(lm, base_params, jnp.asarray(seqs), len(PROMPT) + i - 1), np.float64)
        joint = filtered_probs(logits[:len(prefixes)], sampling) * weight[:, None]  # [prefixes, V]
        marginals.append(joint.sum(0))
        rows, toks = np.nonzero(joint > 0)
        prefixes, weight = np.concatenate([prefixes[rows], toks[:, None].astype(np.int32)], 1), joint[rows, toks]
    return np.array(marginals)


def tv_by_position(samples: np.ndarray, exact: np.ndarray) -> np.ndarray:
    counts = np.stack([np.bincount(samples[:, i], minlength=VOCAB) for i in range(NEW)])
    return 0.5 * np.abs(counts / len(samples) - exact).sum(-1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny Llama with k = 3 random adapters, its plain base, and the exact marginals per filter."""
    model, params, lm = tiny_mtp("llama", VOCAB, tmp_path_factory.mktemp("vocab5"), sharpen=4.0)
    exact = {s: exact_marginals(lm, params["base"], s) for s in (TOP_K, TOP_P)}
    return model, params, exact


@pytest.mark.parametrize("layout,sampling", [
    ((0,), TOP_K),  # the chain: one mask block after t_0, drafts shifted past the tokens already known
    ((0,), TOP_P),
    (None, TOP_P),  # layout `all`: a block after every candidate anchor
], ids=["layout0-top_k", "layout0-top_p", "layout_all-top_p"])
def test_each_position_follows_the_base_distribution(setup, layout, sampling):
    model, params, exact = setup
    samples, acceptance = speculative_sample(model, params, sampling, layout)
    assert acceptance[0] > 0.3 and acceptance[1] > 0.1, f"acceptance {acceptance}: too few drafts accepted to " \
                                                        "test the chain past the first draft"
    tv = tv_by_position(samples, exact[sampling])
    assert tv.max() < BOUND, f"TV distance by emitted position {tv.round(4)}: above {BOUND:.4f} at " \
                             f"{np.flatnonzero(tv >= BOUND).tolist()}"


# Negative controls: the decoder with its verification step changed. Each wraps the decoder's own
# verifier, `_verify(base_logits, drafts, n_drafts, q, sampling, rng, lossy)`: the one private name
# these tests use.
def _ignore_q(verify):
    """Accept every draft the base gives any probability (q -> 0: u * q < p always), correct from p."""
    return lambda logits, d, n, q, s, rng, lossy: verify(logits, d, n, q * 1e-30, s, rng, lossy)


def _accept_with_p(verify):
    """Accept with probability p instead of min(1, p / q) (q -> 1), correct from p instead of p - q."""
    return lambda logits, d, n, q, s, rng, lossy: verify(logits, d, n, jnp.ones_like(q), s, rng, lossy)


def _filter_drafts_only(verify):
    """The sampling filter on the draft side only: verification against the unfiltered base distribution."""
    return lambda logits, d, n, q, s, rng, lossy: verify(logits, d, n, q, Sampling(s.temperature), rng, lossy)


@pytest.mark.parametrize("broken,sampling", [(_ignore_q, TOP_K), (_accept_with_p, TOP_K), (_filter_drafts_only, TOP_P)],
                         ids=["ignore_q", "accept_with_p", "filter_drafts_only"])
def test_broken_verifier_exceeds_the_bound(setup, monkeypatch, broken, sampling):
    """The bound has the power to catch a wrong sampler: each broken verifier, on the layout `0` chain,
    puts some emitted position above it (the first token, drawn before any verification, stays exact)."""
    model, params, exact = setup
    monkeypatch.setattr(decode_module, "_verify", broken(decode_module._verify))
    jax.clear_caches()  # the decoder's jitted programs were traced with the real verifier
    try:
        tv = tv_by_position(speculative_sample(model, params, sampling, (0,))[0], exact[sampling])
    finally:
        monkeypatch.undo()
        jax.clear_caches()  # and must not keep the broken one
    assert tv[0] < BOUND, f"first token TV {tv[0]:.4f}: the control broke more than verification"
    assert tv.max() > 1.5 * BOUND, f"{broken.__name__}: TV by position {tv.round(4)} within 1.5x the bound " \
                                   f"{BOUND:.4f}; the test could not tell this sampler from an exact one"
