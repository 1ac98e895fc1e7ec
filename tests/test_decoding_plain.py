"""JAX KV-cached generation equals transformers' greedy decoding; batching and sampling behave."""

import numpy as np
import pytest
import torch

from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.request import encode_prompt, eos_ids_of
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.models import load_model, load_tokenizer


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_tiny_batched_greedy_matches_transformers(tiny_hf):
    kind, hf, path = tiny_hf
    model, params, config = load_model(path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 17, 1)]
    # eos id that never wins keeps all 12 steps; compare against HF row by row (no padding there)
    outs = generate(model, params, prompts, 12, eos_ids=[config.vocab_size - 1])
    for p, o in zip(prompts, outs):
        ref = hf_greedy(hf, p, 12)
        assert o[: len(ref)] == ref, f"{kind}: prompt of {len(p)} tokens diverged: {o} vs {ref}"


def test_smollm2_greedy_32_tokens_match_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(smollm2_dir)
    model, params, config = load_model(smollm2_dir)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prompts = [encode_prompt(tok, t, chat=True) for t in
               ["Write a Python function that reverses a string.", "Explain what a hash map is in one paragraph."]]
    outs = generate(model, params, prompts, 32, eos_ids_of(tok, config))
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(hf, p, 32), f"diverged from transformers on {tok.decode(p)!r}"
        assert len(o) == 32 or o[-1] in eos_ids_of(tok, config)


def test_stops_at_eos(tiny_hf):
    _, _, path = tiny_hf
    model, params, config = load_model(path)
    prompt = [5, 6, 7]
    free = generate(model, params, [prompt], 8, eos_ids=[config.vocab_size - 1])[0]
    eos = free[2]  # make the third generated token the EOS
    stopped = generate(model, params, [prompt], 8, eos_ids=[eos])[0]
    assert stopped == free[: free.index(eos) + 1]


def test_top_k_1_sampling_is_greedy(tiny_hf):
    _, _, path = tiny_hf
    model, params, config = load_model(path)
    prompts = [[3, 4, 5, 6], [9, 8]]
    greedy = generate(model, params, prompts, 10, eos_ids=[config.vocab_size - 1])
    sampled = generate(model, params, prompts, 10, eos_ids=[config.vocab_size - 1],
                       sampling=Sampling(temperature=1.3, top_k=1), seed=7)
    assert sampled == greedy


def test_sampling_depends_on_seed(tiny_hf):
    _, _, path = tiny_hf
    model, params, config = load_model(path)
    runs = [generate(model, params, [[3, 4, 5]], 16, eos_ids=[config.vocab_size - 1],
                     sampling=Sampling(temperature=2.0), seed=s)[0] for s in (0, 0, 1)]
    assert runs[0] == runs[1], "same seed must give the same sample"
    assert runs[0] != runs[2], "different seeds gave identical 16-token samples"


@pytest.mark.parametrize("bad", [dict(prompts=[[]]), dict(max_new_tokens=0), dict(eos_ids=[])])
def test_bad_generation_arguments(tiny_hf, bad):
    _, _, path = tiny_hf
    model, params, _ = load_model(path)
    kwargs = dict(prompts=[[1, 2]], max_new_tokens=4, eos_ids=[2]) | bad
    with pytest.raises(ValueError):
        generate(model, params, **kwargs)


@pytest.mark.parametrize("per_read", [1, 3])
def test_plain_calls_yield_generates_tokens_call_by_call(tiny_hf, per_read):
    """The server's plain mode: one token per running row per call, `per_read` calls a read (the
    prompt's call alone first), the same tokens as `generate` (greedy and sampled with the same seed),
    a row that hit EOS gaining nothing after it, and each row's calls counted up to each read."""
    from mtp_jax.decoding.plain import plain_calls

    _, _, path = tiny_hf
    model, params, config = load_model(path)
    prompts = [[3, 4, 5, 6], [9, 8], [7] * 20]
    free = generate(model, params, prompts[:1], 9, eos_ids=[config.vocab_size - 1])[0]
    eos = [free[3]]  # row 0 stops after its 4th token; the others run on (or stop where they meet it)
    for sampling, seed in ((Sampling(), 0), (Sampling(temperature=1.1, top_p=0.9), 5)):
        want = generate(model, params, prompts, 9, eos, sampling, seed)
        got = [[] for _ in prompts]
        calls = list(plain_calls(model, params, prompts, 9, eos, sampling, seed, calls_per_read=per_read))
        for i, c in enumerate(calls):
            assert all(len(chunk) <= (1 if i == 0 else per_read) for chunk in c.chunks) and c.accepted.shape == (3, 0)
            for row, chunk in zip(got, c.chunks):
                row.extend(chunk)
            assert c.steps.tolist() == [len(g) for g in got], "a row's calls are its tokens so far"
        assert got == want, sampling
        assert calls[-1].done.all() and len(calls) == 1 + -(-(max(map(len, want)) - 1) // per_read)
    assert len(want[0]) <= 4 or eos[0] not in want[0]
