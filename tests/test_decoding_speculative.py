"""Speculative decoding (mtp_jax.decoding.speculative) is lossless: greedy output is plain greedy decoding token for
token, sampling draws from the base distribution, and steps/acceptance are what the training-path
drafts predict. Tiny random models with a small vocabulary, so random adapters get drafts accepted."""

import dataclasses
import functools
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.decoding.adapter import AdapterMismatchError, check_architecture, check_vocabulary, load_adapter
from mtp_jax.decoding.cache import init_cache
from mtp_jax.decoding.cli import main
from mtp_jax.decoding.layout import plain_of, prepare
from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.request import check_request, encode_prompt, eos_ids_of
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.decoding.speculative import _forward, speculative_generate, speculative_stream, with_draft_vocab
from mtp_jax.models import LoRAConfig, ModelConfig, load_model, load_tokenizer
from mtp_jax.models.llama import CausalLM, unstack_layers
from mtp_jax.mtp.mask_token import mask_embedding
from mtp_jax.mtp.model import MTPConfig, MTPModel
from mtp_jax.mtp.objective import init_params, variables

K = 3
NEW = 24
NEVER = [10_000]  # an EOS id outside the vocabulary: rows run to max_new_tokens


def tiny_mtp(kind: str, vocab: int, tmp_path, sharpen: float = 1.0):
    """(MTPModel with k = K and random non-zero adapters, its params, the plain base CausalLM)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from conftest import TINY_LLAMA, TINY_QWEN3, save_hf

    torch.manual_seed(0)
    if kind == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "vocab_size": vocab}))
    else:
        hf = Qwen3ForCausalLM(Qwen3Config(**{**TINY_QWEN3, "vocab_size": vocab}))
    _, base, config = load_model(save_hf(hf, tmp_path / f"{kind}_{vocab}"))
    # a larger final-norm weight sharpens the base distribution (same argmax, lower entropy)
    base["model"]["norm"]["weight"] = base["model"]["norm"]["weight"] * sharpen
    model = MTPModel(config, LoRAConfig(rank=4, alpha=8.0), MTPConfig(draft_length=K))
    row = mask_embedding(base["model"]["embed_tokens"]["embedding"], vocab)
    # random non-zero adapters (B = 0 at init would hide them); eval_shape: no init compile
    shapes = jax.eval_shape(lambda r: init_params(model, {}, row, r), jax.random.key(0))
    rng = np.random.default_rng(1)  # numpy: jax.random would compile once per shape

    def rand(path, s):
        noise = rng.standard_normal(s.shape).astype(s.dtype)
        return jnp.asarray(1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.1 * noise)

    params = {"base": base, "lora": jax.tree_util.tree_map_with_path(rand, shapes["lora"]),
              "sampler": jax.tree_util.tree_map_with_path(rand, shapes["sampler"]), "mask_embedding": row}
    return model, params, CausalLM(config)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    return {kind: tiny_mtp(kind, 16, tmp_path_factory.mktemp(kind)) for kind in ("llama", "qwen3")}


def prompts_for(vocab: int):
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n).tolist() for n in (5, 17, 1, 9)]  # 17: a second padding bucket


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_equals_plain_greedy_batched_with_eos(setups, kind):
    model, params, lm = setups[kind]
    prompts = prompts_for(16)
    free = generate(lm, params["base"], prompts, NEW, NEVER)
    # an EOS that ends some rows early and never occurs in others
    eos = next(t for t in range(16) if any(t in row[2:] for row in free) and any(t not in row for row in free))
    ref = generate(lm, params["base"], prompts, NEW, [eos])
    res = speculative_generate(model, params, prompts, NEW, [eos])
    assert res.tokens == ref, f"{kind}: speculative greedy diverged from plain greedy"
    assert any(len(r) < NEW for r in ref) and any(len(r) == NEW for r in ref), "EOS case not covered"
    assert res.accepted.sum() > 0, f"{kind}: no draft accepted; the verification path went untested"
    laid_out = speculative_generate(*prepare(model, params), prompts, NEW, [eos])  # already in the layout
    assert laid_out.tokens == ref and (laid_out.accepted == res.accepted).all(), f"{kind}: decoding layout differs"


@functools.partial(jax.jit, static_argnums=0)
def training_path_drafts(model, params, tokens, segment_ids):
    """Greedy drafts [b, len, k] at every anchor of right-padded rows, through the training code
    (MTPModel.regular + mask_hidden: two-stream attention; prev_1 = base argmax, then the sampler's own)."""
    v = variables(params)
    b, length = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    hidden, kv = model.apply(v, tokens, pos, segment_ids, method=MTPModel.regular)
    mask_h = model.apply(v, params["mask_embedding"], jnp.arange(length), pos, segment_ids, kv,
                         method=MTPModel.mask_hidden)
    prev = jnp.argmax(model.apply(v, hidden, method=lambda m, h: m.base.logits(h)), -1)
    drafts = []
    for j in range(model.mtp.draft_length):
        logits = model.apply(v, prev, mask_h[:, :, j],
                             method=lambda m, p, h: m.base.logits(m.sampler(m.base.embed(p), h)))
        prev = jnp.argmax(logits, -1)
        drafts.append(prev)
    return jnp.stack(drafts, -1)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_steps_and_acceptance_follow_training_path_drafts(setups, kind):
    """Replays decoding with drafts from the training code: same steps and accepted drafts per position."""
    model, params, lm = setups[kind]
    prompts = prompts_for(16)
    res = speculative_generate(model, params, prompts, NEW, NEVER)
    truth = generate(lm, params["base"], prompts, NEW + K + 1, NEVER)  # verification looks past NEW
    seqs = [p + c for p, c in zip(prompts, truth)]
    tokens, segment_ids = np.zeros((2, len(seqs), 48), np.int32)
    for row, seq in enumerate(seqs):
        tokens[row, :len(seq)], segment_ids[row, :len(seq)] = seq, 1
    all_drafts = np.asarray(training_path_drafts(model, params, jnp.asarray(tokens), jnp.asarray(segment_ids)))
    for row, (prompt, seq, drafts) in enumerate(zip(prompts, seqs, all_drafts)):
        anchor, emitted, steps, accepted = len(prompt) - 1, 1, 1, np.zeros(K, int)
        while emitted < NEW:
            d, n = drafts[anchor], 0  # d[i] proposes seq[anchor + 2 + i]: the token after the emitted one
            while n < K and d[n] == seq[anchor + 2 + n]:
                n += 1
            accepted[:n] += 1
            anchor, emitted, steps = anchor + n + 1, emitted + n + 1, steps + 1
        assert res.steps[row] == steps, f"{kind} row {row}: {res.steps[row]} steps, replay says {steps}"
        np.testing.assert_array_equal(res.accepted[row], accepted, err_msg=f"{kind} row {row}")
        np.testing.assert_array_equal(res.offered[row], [steps - 1] * K, err_msg=f"{kind} row {row}")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_mask_states_equal_training_path(setups, kind):
    """The mask blocks' final hidden states in a decoding call (the prompt call, then a step with every
    anchor offset 0..k, left-padded rows), with the adapters as trained and in both decoding layouts, equal
    the training code's two-stream mask states at the same anchors: each block sees exactly the cache up
    to its anchor and its own earlier masks."""
    model, params, lm = setups[kind]
    prompts = prompts_for(16)[:2]  # lengths 5 and 17: the first row is left-padded by 12
    truth = generate(lm, params["base"], prompts, K + 2, NEVER)
    tokens, pad_len = (jnp.asarray(x) for x in check_request(prompts, 2 * K, NEVER, 0, 1024))
    t, anchors = tokens.shape[1], tuple(range(K + 1))
    slot_valid = jnp.arange(t + 3 * K + len(anchors) * K)[None, :] >= pad_len[:, None]
    zero = jnp.zeros(len(prompts), jnp.int32)
    step_tokens = jnp.asarray([row[:K + 1] for row in truth])  # t_0 and k drafts that happen to be right
    states = {}
    n = model.config.num_layers
    trained = (model.clone(mtp=dataclasses.replace(model.mtp, scan_layers=False)),
               {**params, "base": unstack_layers(params["base"], n), "lora": unstack_layers(params["lora"], n)})
    layouts = {"trained": trained, "decoding": prepare(model, params), "merged": prepare(model, params, merged=True)}
    for layout, (m, p) in layouts.items():
        cache = init_cache(lm.config, len(prompts), slot_valid.shape[1], lm.dtype)
        _, first_block, cache = _forward(m, p, cache, zero, pad_len, slot_valid, tokens, (t - 1,), K, last_only=True)
        states[layout] = first_block, _forward(m, p, cache, zero + t, pad_len, slot_valid, step_tokens, anchors, K)[1]

    seqs = np.zeros((len(prompts), 32), np.int32)
    segment_ids = np.zeros_like(seqs)
    for row, (prompt, cont) in enumerate(zip(prompts, truth)):
        seqs[row, :len(prompt) + len(cont)], segment_ids[row, :len(prompt) + len(cont)] = prompt + cont, 1
    v = variables(params)
    pos = jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape)
    _, kv = model.apply(v, jnp.asarray(seqs), pos, jnp.asarray(segment_ids), method=MTPModel.regular)
    ref = np.asarray(model.apply(v, params["mask_embedding"], jnp.arange(seqs.shape[1]), pos,
                                 jnp.asarray(segment_ids), kv, method=MTPModel.mask_hidden))  # [b, anchor, k, d]
    for (layout, (first_block, blocks)), (row, prompt) in itertools.product(states.items(), enumerate(prompts)):
        a = len(prompt) - 1
        np.testing.assert_allclose(np.asarray(first_block[row, 0]), ref[row, a], atol=2e-5,
                                   err_msg=f"{kind} {layout} row {row}: prompt call")
        for s in anchors:
            np.testing.assert_allclose(np.asarray(blocks[row, s]), ref[row, a + 1 + s], atol=2e-5,
                                       err_msg=f"{kind} {layout} row {row}: block at anchor offset {s}")


def test_decoding_layout_casts_params_once_to_the_same_values(setups):
    """bf16 compute with float32 adapters (the shipped GPU config): prepare casts every floating
    parameter to bf16 once, and a decoding call then gives bit for bit what the uncast layout gives
    (every use casts to the compute dtype itself), and its parameters are all bf16."""
    from mtp_jax.decoding.layout import adapters_into_base
    from mtp_jax.decoding.model import DecodeLayer
    from mtp_jax.models.lora import fuse_adapters

    model, params, lm = setups["llama"]
    model = model.clone(dtype=jnp.bfloat16)
    params = {**params, "base": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params["base"])}
    cfg, lora = fuse_adapters(model.lora, params["lora"])
    base, lora = adapters_into_base(params["base"], lora)
    n = model.config.num_layers
    uncast = (model.clone(lora=cfg, mtp=dataclasses.replace(model.mtp, scan_layers=False), layer=DecodeLayer),
              {**params, "base": unstack_layers(base, n), "lora": unstack_layers(lora, n)})
    cast = prepare(model, params)
    assert {x.dtype for x in jax.tree.leaves(uncast[1])} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(cast[1])} == {jnp.dtype(jnp.bfloat16)}
    prompts = prompts_for(16)[:2]
    tokens, pad_len = (jnp.asarray(x) for x in check_request(prompts, 2 * K, NEVER, 0, 1024))
    slot_valid = jnp.arange(tokens.shape[1] + 3 * K + (K + 1) * K)[None, :] >= pad_len[:, None]
    zero = jnp.zeros(len(prompts), jnp.int32)
    outs = [_forward(m, p, init_cache(lm.config, len(prompts), slot_valid.shape[1], jnp.bfloat16), zero,
                     pad_len, slot_valid, tokens, tuple(range(K + 1)), K) for m, p in (uncast, cast)]
    for name, a, b in zip(("logits", "mask hidden", "cache"), *outs):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert x.dtype == y.dtype and np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)), name


@pytest.mark.parametrize("draft_length,anchors", [(K, (0,)), (2, (0, 2))])
def test_fewer_mask_blocks_and_smaller_k_stay_exact(setups, draft_length, anchors):
    model, params, lm = setups["llama"]
    prompts = prompts_for(16)
    res = speculative_generate(model, params, prompts, NEW, NEVER, draft_length=draft_length, anchors=anchors)
    assert res.tokens == generate(lm, params["base"], prompts, NEW, NEVER)
    assert res.accepted.shape == (len(prompts), draft_length)
    assert res.accepted.sum() > 0


def test_lossy_option_accepts_confident_drafts(setups):
    """lossy = 0: every draft is 'confident', so each call emits k + 1 tokens (the drafts and y_k)."""
    model, params, _ = setups["llama"]
    prompts = prompts_for(16)
    res = speculative_generate(model, params, prompts, NEW, NEVER, lossy=0.0)
    np.testing.assert_array_equal(res.steps, 1 + -(-(NEW - 1) // (K + 1)))
    np.testing.assert_array_equal(res.accepted, res.offered)
    assert all(len(t) == NEW for t in res.tokens)


def test_stream_yields_the_same_tokens(setups):
    model, params, _ = setups["llama"]
    prompts = prompts_for(16)[:2]
    whole = speculative_generate(model, params, prompts, NEW, NEVER)
    got, last = [[] for _ in prompts], None
    for chunks, last in speculative_stream(model, params, prompts, NEW, NEVER):
        for row, chunk in zip(got, chunks):
            row.extend(chunk)
    assert got == whole.tokens == last.tokens
    np.testing.assert_array_equal(last.steps, whole.steps)


def test_calls_read_three_at_a_time_give_the_same_decoding(setups):
    """speculative_calls with calls_per_read=3: the prompt's call alone, then reads of up to 3 calls
    each (at most 3 (k + 1) new tokens a row), the tokens and counters of one call a read."""
    from mtp_jax.decoding.speculative import speculative_calls

    model, params, _ = setups["llama"]
    prompts = prompts_for(16)[:2]
    one = list(speculative_calls(model, params, prompts, NEW, NEVER))
    three = list(speculative_calls(model, params, prompts, NEW, NEVER, calls_per_read=3))
    assert len(three) == 1 + -(-(len(one) - 1) // 3)
    assert all(len(chunk) <= 3 * (K + 1) for call in three[1:] for chunk in call.chunks)
    joined = lambda calls: [sum((c.chunks[r] for c in calls), []) for r in range(len(prompts))]  # noqa: E731
    assert joined(three) == joined(one)
    for got, want in zip(three[1:], one[3::3]):  # each read's counters are those after its last call
        np.testing.assert_array_equal(got.steps, want.steps)
        np.testing.assert_array_equal(got.accepted, want.accepted)
    np.testing.assert_array_equal(three[-1].steps, one[-1].steps)
    np.testing.assert_array_equal(three[-1].offered, one[-1].offered)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_draft_vocabulary_keeps_greedy_exact(setups, kind):
    """with_draft_vocab: drafts come from the given token ids only. The whole vocabulary drafts as the full
    head does (the same acceptance); one token that plain greedy never emits gets no draft accepted; both
    give plain greedy output, through the decoding layout too."""
    model, params, lm = setups[kind]
    prompts = prompts_for(16)
    ref = generate(lm, params["base"], prompts, NEW, NEVER)
    full = speculative_generate(model, params, prompts, NEW, NEVER)
    whole = speculative_generate(model, with_draft_vocab(model, params, range(16)), prompts, NEW, NEVER)
    assert whole.tokens == ref and (whole.accepted == full.accepted).all() and full.accepted.sum() > 0
    unused = next(t for t in range(16) if all(t not in row for row in ref))
    laid_out = prepare(model, params)
    for m, p in ((model, params), laid_out):
        one = speculative_generate(m, with_draft_vocab(m, p, [unused]), prompts, NEW, NEVER)
        assert one.tokens == ref and one.accepted.sum() == 0, kind


def test_greedy_drafts_from_a_vocabulary_list_equal_the_masked_full_row(setups):
    """Greedy drafts from a drafting vocabulary take the argmax over the list's logits, mapped back to ids;
    the distributions path (sampling, lossy) scores a full row with -inf outside the list. Both give the
    same drafts for the same mask states, known tokens included."""
    from mtp_jax.decoding.speculative import _draft

    model, params, _ = setups["llama"]
    m, p = prepare(model, params)
    p = with_draft_vocab(m, p, [1, 4, 6, 9, 10, 13, 15])
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(3.0 * rng.standard_normal((6, K, model.config.hidden_size)), jnp.float32)
    known = jnp.asarray(rng.integers(0, 16, (6, K)), jnp.int32)
    n_known = jnp.asarray([1, 1, 2, 3, 1, 2], jnp.int32)
    by_list, _, n1 = _draft(m, p, hidden, known, n_known, Sampling(), jax.random.key(0), keep_q=False)
    masked, q, n2 = _draft(m, p, hidden, known, n_known, Sampling(), jax.random.key(0), keep_q=True)
    np.testing.assert_array_equal(np.asarray(by_list), np.asarray(masked))
    np.testing.assert_array_equal(np.asarray(n1), np.asarray(n2))
    assert set(np.asarray(by_list).ravel()) <= {1, 4, 6, 9, 10, 13, 15} and len(set(np.asarray(by_list).ravel())) > 2
    assert q is not None and float(q[..., 0].max()) == 0.0  # id 0 is off the list


def test_draft_vocabulary_refuses_ids_outside_the_model(setups):
    model, params, _ = setups["llama"]
    for bad in ([], [3, 16], [-1]):
        with pytest.raises(ValueError, match="draft vocabulary"):
            with_draft_vocab(model, params, bad)


def test_top_k_1_sampling_is_greedy(setups):
    """With top-k = 1 base and draft distributions are one-hot: rejection sampling must give greedy."""
    model, params, lm = setups["llama"]
    prompts = prompts_for(16)
    res = speculative_generate(model, params, prompts, NEW, NEVER, sampling=Sampling(1.3, top_k=1), seed=3)
    assert res.tokens == generate(lm, params["base"], prompts, NEW, NEVER)


@pytest.mark.parametrize("draft_vocab", [None, (0, 2, 3, 5, 6)])
def test_sampling_matches_base_distribution(tmp_path, draft_vocab):
    """Marginals of the first 4 sampled tokens (3 of them drafted) vs the exact base distribution; also
    with drafts from 5 of the 8 tokens only (with_draft_vocab: q is zero outside them).

    6000 samples over 8 tokens: here the distances come out at 0.007-0.014 (sampling noise).
    Measured on this same setup with deliberately broken samplers (tokens 2-4): accepting every
    draft gives TV 0.43-0.59, accepting with probability p instead of p/q 0.12-0.15, drawing the
    correction from p instead of max(0, p - q) 0.08-0.10; the threshold 0.035 fails all three.
    """
    vocab, n, temperature, top_k = 8, 6000, 0.9, 6
    model, params, lm = tiny_mtp("llama", vocab, tmp_path, sharpen=12.0)
    prompt = [3, 5, 4, 7, 6]
    drafting = params if draft_vocab is None else with_draft_vocab(model, params, draft_vocab)
    res = speculative_generate(model, drafting, [prompt] * n, 4, NEVER, sampling=Sampling(temperature, top_k), seed=0)
    # exact: the base model on every continuation of 3 tokens; temperature and top-k in numpy
    conts = np.array([prompt + list(c) for c in itertools.product(range(vocab), repeat=3)])
    logits = np.asarray(lm.apply({"params": params["base"]}, jnp.asarray(conts), method=CausalLM.forward_logits),
                        np.float64)[:, len(prompt) - 1:] / temperature  # [V^3, 4, V]
    logits[logits < np.sort(logits, -1)[..., -top_k:-top_k + 1]] = -np.inf
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    v = vocab
    joint = (p[0, 0][:, None, None, None] * p[:: v * v, 1].reshape(v, v)[:, :, None, None]
             * p[::v, 2].reshape(v, v, v)[..., None] * p[:, 3].reshape(v, v, v, v))
    samples = np.array(res.tokens)
    for i in range(4):
        exact = joint.sum(axis=tuple(a for a in range(4) if a != i))
        tv = 0.5 * np.abs(np.bincount(samples[:, i], minlength=v) / n - exact).sum()
        assert tv < 0.035, f"token {i + 1}: TV distance {tv:.4f} from the base distribution"
    assert 0.1 < res.acceptance[0] < 0.9, f"acceptance {res.acceptance}: accept and reject paths both needed"


@pytest.mark.parametrize("case,match", [
    ("empty prompt", "at least one token"),
    ("k above the adapter's", "trained with k = 3"),
    ("anchors without 0", "including 0"),
    ("no adapters", "lack"),
    ("base model", "needs an MTPModel"),
    ("lossy sampling", "needs greedy"),
])
def test_bad_inputs(setups, case, match):
    model, params, lm = setups["llama"]
    kwargs = dict(model=model, params=params, prompts=[[3, 4]], max_new_tokens=4, eos_ids=[2])
    kwargs |= {"empty prompt": dict(prompts=[[3, 4], []]), "k above the adapter's": dict(draft_length=K + 1),
               "anchors without 0": dict(anchors=(1, 2)), "no adapters": dict(params={"base": params["base"]}),
               "base model": dict(model=lm), "lossy sampling": dict(lossy=0.9, sampling=Sampling(1.0))}[case]
    with pytest.raises((ValueError, TypeError), match=match):
        speculative_generate(**kwargs)


def test_adapter_for_another_model_or_vocabulary(smollm2_dir):
    from conftest import TINY_LLAMA, TINY_QWEN3

    llama = ModelConfig.from_hf({**TINY_LLAMA, "model_type": "llama"})
    check_architecture(llama, llama, "same")
    with pytest.raises(AdapterMismatchError, match="another model.*model_type llama vs qwen3"):
        check_architecture(llama, ModelConfig.from_hf({**TINY_QWEN3, "model_type": "qwen3"}), "qwen3")
    trained = load_tokenizer(smollm2_dir)
    trained.add_special_tokens({"additional_special_tokens": ["<mask>"]})
    base = load_tokenizer(smollm2_dir)
    check_vocabulary(trained, "<mask>", base, "same")
    base.add_tokens(["<extra>"])
    with pytest.raises(AdapterMismatchError, match="another vocabulary"):
        check_vocabulary(trained, "<mask>", base, "extra token")


@pytest.mark.parametrize("argv,match", [
    (["--adapter", "{tmp}", "--prompt", "hi"], "not a training run directory"),
    (["--adapter", "{tmp}", "--prompt", " "], "empty"),
])
def test_cli_bad_input(tmp_path, capsys, argv, match):
    """Bad input: exit status 2 and one `error:` line on stderr, no traceback."""
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main(["--draft_length", "2", "--prompt", "hi"])
    assert exit_.value.code == 2 and "need --adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--draft_vocab", "100", "--prompt", "hi"])
    assert exit_.value.code == 2 and "need --adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_trained_adapter(tmp_path, capsys):
    """SmolLM2-135M with adapters from a short run of the default config: speculative greedy equals
    plain greedy (batch of 3); the CLI streams and reports; another model is refused."""
    from conftest import make_hf_model, save_hf
    from mtp_jax.config import load_config
    from mtp_jax.train import Config
    from mtp_jax.train.loop import run

    cfg = load_config(Config, Path(__file__).parents[1] / "configs" / "smollm2_k4.yaml", [
        "--train.save_dir", str(tmp_path / "run"), "--train.max_steps", "4", "--optim.warmup_steps", "0",
        "--data.eval_file", "null", "--data.cache_dir", str(tmp_path / "cache"), "--train.progress", "false"])
    run_dir = str(run(cfg)["run_dir"])
    model, params, tok = load_adapter(run_dir)
    texts = ["Write a Python function that returns the sum of a list.", "What is 15 + 27?",
             "Explain what a hash map is in one paragraph."]
    prompts = [encode_prompt(tok, t, chat=True) for t in texts]
    eos = eos_ids_of(tok, model.config)
    res = speculative_generate(model, params, prompts, 48, eos)
    assert res.tokens == generate(*plain_of(model, params), prompts, 48, eos)  # load_adapter lays params out
    assert main(["--adapter", run_dir, "--prompt", texts[0], "--max_new_tokens", "16"]) == 0
    out = capsys.readouterr()
    assert texts[0] in out.out and "tokens/step" in out.err
    other = save_hf(make_hf_model("llama"), tmp_path / "tiny_llama")
    assert main(["--adapter", run_dir, "--model", str(other), "--prompt", "hi"]) == 2
    assert "another model" in capsys.readouterr().err
