"""Lossless speculative decoding with the trained MTP drafts (SPEC §10).

Each step runs the model once on the pending token t_0 (the last accepted token, not yet in the
KV cache), the k drafts d_1..d_k of the previous step, and blocks of k `<mask>` tokens:

    regular   [t_0, d_1, .., d_k]        gate off, K/V written to the cache at the row's length L
    masks     block s = [m_{s,1}..m_{s,k}] for each anchor offset s in `anchors` (0 = t_0, i = d_i)

The base logits at t_0 and d_i predict the tokens after them (y_0..y_k): drafts are accepted while
d_i == y_{i-1} (greedy) or pass the rejection test (sampling); with n accepted the step emits
d_1..d_n and one more token (y_n, or a sample of the residual distribution), n + 1 in all.

Where the next drafts come from is the catch: masks must sit right after the last accepted token
(the anchor a, whose base argmax is prev_1, SPEC §4), but n is known only at the end of the
forward pass the masks are part of. So the masks come in blocks, one per candidate anchor offset
s; block s attends to the cache, the regular tokens t_0..d_s and its own earlier masks (never to
other blocks, nor to drafts after d_s), at positions L - pad + s + j. After verification the
block with the largest s <= n is used. With `anchors = (0..k)` (default; the paper's "quadratic"
layout, (k+1)k masks) that is s = n and every step drafts k fresh tokens. With fewer blocks
(e.g. `(0,)`: k masks, the "linear" cost) block s < n still helps: its draft j predicts the
token at offset s + j + 1, so drafts j >= n + 1 - s are still ahead of the emitted text; the
sampler chain runs on the emitted tokens as prev where they are known, and the step offers
k - n + s drafts instead of k. Every layout is exact; they trade mask tokens for drafts.

Cache: a step writes its k + 1 regular tokens and then its masks per row at the row's own length L
(rows accept different counts), and L advances by n + 1: the rejected drafts' and the masks' entries
sit beyond L, hidden by the causal rule and overwritten by the next step's write, so below L the
cache holds regular tokens only. (Writing the masks there lets attention read the cache alone
instead of a copy of it joined to the mask keys, two copies per layer per call.) Greedy output
equals plain greedy decoding token for token (up to float reduction order: the tests check fp32);
sampling uses standard speculative rejection sampling (accept d_i with probability min(1, p/q),
else draw from max(0, p - q)), which preserves the base distribution under the same temperature /
top-k / top-p filter as `decoding.plain`. One option gives that up:
`lossy=p` (ConfAdapt-style, off by default) also accepts drafts the sampler is at least p sure of.

Exact mode (SPEC §10). In bf16 a call that scores 25 rows can round a row differently from a call
that scores one. Every call of this decoder after the prompt has one shape (k + 1 regular rows and
the mask blocks), and each row's matmul, attention and norm reductions depend only on that row and
the call's shape, not on the row's index or on the other rows: masked cache slots add exact zeros.
`plain.generate(exact=True)` decodes plain greedy through this very program with verification off
(`speculate=False`: no draft is offered, so each call emits the base model's own next token), so a
token's base logits are the same bits whichever decoder scored it, and bf16 speculative output
equals exact plain greedy output token for token. Sharing the compiled program, not only the
shapes, keeps XLA from fusing the two differently. It costs a speculative call per plain token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.decoding.cache import init_cache, spec_attend
from mtp_jax.decoding.layout import prepare
from mtp_jax.decoding.request import check_request
from mtp_jax.decoding.sampling import Sampling, filter_logits, sample_token
from mtp_jax.mtp.model import MTPModel
from mtp_jax.mtp.objective import Params, variables


class DecodeState(NamedTuple):
    cache: tuple  # per layer (k, v) [batch, slots, kv_heads, head_dim]: regular tokens below `length`
    length: jax.Array  # [b] valid cache slots (prompt padding included)
    pending: jax.Array  # [b] t_0: emitted, not yet in the cache
    drafts: jax.Array  # [b, k] proposals for the tokens after t_0
    n_drafts: jax.Array  # [b] how many of `drafts` are real (k unless fewer mask blocks)
    q: jax.Array | None  # [b, k, vocab] draft distributions (sampling, or the lossy option)
    out: jax.Array  # [b, max_new + k + 1] emitted tokens
    logits: jax.Array | None  # [b, max_new + k + 1, vocab] base logits each emitted token came from (keep_logits)
    n_out: jax.Array  # [b]
    done: jax.Array  # [b]
    steps: jax.Array  # [b] model calls while the row was running (prompt call included)
    accepted: jax.Array  # [b, k] drafts accepted per draft position
    offered: jax.Array  # [b, k] drafts verified per draft position
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    tokens: list[list[int]]  # new tokens per prompt, ending at (and including) the first EOS
    steps: np.ndarray  # [batch] model calls per row, the prompt's included
    accepted: np.ndarray  # [batch, k]
    offered: np.ndarray  # [batch, k]
    logits: list[np.ndarray] | None = None  # per row [len(tokens), vocab]: the base logits of each token

    @property
    def tokens_per_step(self) -> float:
        return sum(map(len, self.tokens)) / max(int(self.steps.sum()), 1)

    @property
    def acceptance(self) -> np.ndarray:
        """[k] share of the steps offering a j-th draft in which drafts 1..j were all accepted."""
        return self.accepted.sum(0) / np.maximum(self.offered.sum(0), 1)


def check_layout(model: MTPModel, draft_length: int | None, anchors: Sequence[int] | None) -> tuple[int, tuple]:
    """(k, anchor offsets) for decoding; k may be lower than the adapter's, never higher."""
    trained = model.mtp.draft_length
    k = trained if draft_length is None else draft_length
    if not 1 <= k <= trained:
        raise ValueError(f"draft_length {k}: the adapter was trained with k = {trained} masks per anchor; "
                         f"decode with 1 <= k <= {trained} (masks beyond the trained k were never trained)")
    anchors = tuple(range(k + 1)) if anchors is None else tuple(sorted(set(int(a) for a in anchors)))
    if not anchors or anchors[0] != 0 or anchors[-1] > k:
        raise ValueError(f"anchors {anchors}: need offsets in [0, {k}] including 0 (the block after t_0 is "
                         "the fallback when the first draft is rejected)")
    return k, anchors


def _forward(model: MTPModel, params: Params, cache, length, pad_len, slot_valid, tokens, anchors, k,
             last_only=False):
    """Regular tokens [b, R] after `length` plus mask blocks at `anchors` -> base logits [b, R, V]
    ([b, V] of the last token if `last_only`), mask hidden [b, blocks, k, d], updated cache."""
    b, r = tokens.shape
    mask_anchor = np.repeat(np.asarray(anchors), k)
    mask_step = np.tile(np.arange(1, k + 1), len(anchors))
    offsets = np.concatenate([np.arange(r), mask_anchor + mask_step])
    positions = jnp.maximum(length[:, None] - pad_len[:, None] + offsets[None], 0)
    gate = jnp.broadcast_to(jnp.asarray(np.arange(len(offsets)) >= r, model.dtype), positions.shape)
    attend = spec_attend(length, slot_valid, r, mask_anchor, mask_step)

    def run(m, tokens, mask_row):
        emb = m.base.embed(tokens)
        emb = jnp.concatenate([emb, jnp.broadcast_to(mask_row.astype(emb.dtype), (b, len(mask_anchor), emb.shape[-1]))],
                              axis=1)
        hidden, new_cache = m.base(None, positions, attend, gate=gate, embeddings=emb, layer_state=cache)
        regular = hidden[:, r - 1] if last_only else hidden[:, :r]
        return m.base.logits(regular), hidden[:, r:].reshape(b, len(anchors), k, -1), new_cache

    return model.apply(variables(params), tokens, params["mask_embedding"], method=run)


def _draft(model: MTPModel, params: Params, hidden, known, n_known, sampling: Sampling, rng, keep_q: bool):
    """Sampler chain over one mask block (SPEC §4) -> the drafts ahead of the emitted text.

    hidden [b, k, d]: the block's mask states; known [b, k]: the emitted token at each mask's own
    offset, used as prev_j for j <= n_known; after that prev_j is draft j - 1. Drafts j >= n_known
    predict tokens not yet emitted: returned shifted to the front, with their count and (sampling)
    their distributions q.
    """
    b, k, _ = hidden.shape
    vocab = params.get("draft_vocab")  # a drafting vocabulary (with_draft_vocab): -inf outside it
    # greedy drafts from a drafting vocabulary: the argmax over its (ascending) ids, mapped back, is the
    # full row's argmax (ties to the lowest id either way), with no full-vocabulary row built per draft
    by_list = vocab is not None and sampling.temperature == 0.0 and not keep_q
    if vocab is not None:
        head = params["draft_head"]

        def step_logits(m, prev, h):
            sub = m.sampler(m.base.embed(prev), h).astype(m.dtype) @ head.astype(m.dtype)
            if by_list:
                return sub
            return jnp.full(sub.shape[:-1] + (m.config.vocab_size,), -jnp.inf, sub.dtype).at[..., vocab].set(sub)
    else:
        step_logits = lambda m, prev, h: m.base.logits(m.sampler(m.base.embed(prev), h))  # noqa: E731
    prev, drafts, qs = known[:, 0], [], []
    for j in range(k):
        logits = model.apply(variables(params), prev, hidden[:, j], method=step_logits)
        rng, sub = jax.random.split(rng)
        tok = vocab[jnp.argmax(logits, axis=-1)] if by_list else sample_token(logits, sub, sampling)
        drafts.append(tok)
        if keep_q:
            qs.append(jax.nn.softmax(filter_logits(logits, sampling) if sampling.temperature > 0
                                     else logits.astype(jnp.float32), axis=-1))
        if j + 1 < k:
            prev = jnp.where(j + 1 < n_known, known[:, j + 1], tok)
    shift = jnp.clip(n_known[:, None] - 1 + jnp.arange(k), 0, k - 1)
    drafts = jnp.take_along_axis(jnp.stack(drafts, 1), shift, axis=1)
    q = jnp.take_along_axis(jnp.stack(qs, 1), shift[..., None], axis=1) if qs else None
    return drafts, q, k + 1 - n_known


def with_draft_vocab(model: MTPModel, params: Params, vocab: Sequence[int]) -> Params:
    """`params` with a drafting vocabulary: the sampler chain scores only the token ids `vocab` (for
    instance the training data's most frequent ones), against the output matrix's columns for them,
    gathered here once. Each of the k draft steps then reads len(vocab) columns instead of the whole
    vocabulary's: at 8B shapes the k full reads are about a third of a speculative call's bytes. Decoding
    stays lossless: the base model verifies with its full head, greedy output equals plain greedy output,
    and sampling draws from the base distribution (a draft distribution that is zero outside `vocab` only
    lowers acceptance)."""
    ids = np.unique(np.asarray(vocab, np.int64))
    if np.asarray(vocab).ndim != 1 or ids.size == 0 or ids[0] < 0 or ids[-1] >= model.config.vocab_size:
        raise ValueError(f"draft vocabulary: need a non-empty list of token ids in [0, {model.config.vocab_size})")
    matrix = model.apply(variables(params), method=lambda m: m.base.output_matrix())
    return {**params, "draft_vocab": jnp.asarray(ids, jnp.int32), "draft_head": matrix[:, ids]}


def _verify(base_logits, drafts, n_drafts, q, sampling: Sampling, rng, lossy: float | None):
    """base_logits [b, k+1, V] at t_0, d_1..d_k -> (n accepted [b], emitted [b, k+1]: d_1..d_n, then
    the correction/bonus token at index n; entries after n are unused). With n_drafts = 0 (no draft
    offered) n = 0 and the emitted token is the base model's own (its argmax, or a sample of it).

    `lossy` (greedy only; LOSSY, ConfAdapt-style): a draft whose sampler probability is >= lossy is
    accepted even where the base model disagrees, so the output is no longer the base's greedy text.
    """
    b, k = drafts.shape
    idx = jnp.arange(k + 1)
    in_range = jnp.arange(k)[None] < n_drafts[:, None]
    if sampling.temperature == 0.0:
        y = jnp.argmax(base_logits, axis=-1).astype(jnp.int32)
        ok = drafts == y[:, :k]
        if lossy is not None:
            ok = ok | (jnp.take_along_axis(q, drafts[..., None], -1)[..., 0] >= lossy)
        n = jnp.sum(jnp.cumprod((ok & in_range).astype(jnp.int32), axis=1), axis=1)
        bonus = jnp.take_along_axis(y, n[:, None], axis=1)
        return n, jnp.where(idx[None] < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), bonus)
    p = jax.nn.softmax(filter_logits(base_logits, sampling), axis=-1)  # [b, k+1, V]
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    rng_u, rng_bonus = jax.random.split(rng)
    ok = (jax.random.uniform(rng_u, (b, k)) * q_d < p_d) & in_range  # u < p/q without dividing by q
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), n[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - jnp.where((n < n_drafts)[:, None], q_n, 0.0), 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)  # p == q: rejection had prob 0
    bonus = jax.random.categorical(rng_bonus, jnp.log(residual), axis=-1).astype(jnp.int32)
    emitted = jnp.where(idx[None] < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
    return n, emitted


def _prefill(model, params, tokens, pad_len, eos_ids, rng, max_new_tokens, sampling, k, blocks, lossy,
             keep_logits=False):
    """Prompt call: fills the cache, emits the first token, drafts k from a mask block after the prompt.
    The cache holds the prompt, the new tokens and one step's k + 1 regular and `blocks` x k mask entries."""
    b, t = tokens.shape
    slots = t + max_new_tokens + k + blocks * k
    slot_valid = jnp.arange(slots)[None, :] >= pad_len[:, None]
    length = jnp.zeros((b,), jnp.int32)
    cache = init_cache(model.config, b, slots, model.dtype)
    last, hidden, cache = _forward(model, params, cache, length, pad_len, slot_valid, tokens, (t - 1,), k,
                                   last_only=True)
    rng, r_first, r_draft = jax.random.split(rng, 3)
    first = sample_token(last, r_first, sampling)
    known = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first)
    drafts, q, n_drafts = _draft(model, params, hidden[:, 0], known, jnp.ones((b,), jnp.int32), sampling, r_draft,
                                 sampling.temperature > 0 or lossy is not None)
    width = max_new_tokens + k + 1
    out = jnp.zeros((b, width), jnp.int32).at[:, 0].set(first)
    logits = jnp.zeros((b, width, last.shape[-1]), last.dtype).at[:, 0].set(last) if keep_logits else None
    zeros_k = jnp.zeros((b, k), jnp.int32)
    return DecodeState(cache, length + t, first, drafts, n_drafts, q, out, logits, jnp.ones((b,), jnp.int32),
                       jnp.isin(first, eos_ids) | (max_new_tokens <= 1), jnp.ones((b,), jnp.int32), zeros_k,
                       zeros_k, rng), slot_valid


def _step(model, params, state: DecodeState, pad_len, slot_valid, eos_ids, speculate, max_new_tokens, sampling, k,
          anchors, lossy):
    """One verify-and-draft call for every row; finished rows keep their state. `speculate` (a traced
    bool, so both settings run one compiled program): False offers no draft, so the call emits the
    base model's next token alone (exact-mode plain decoding)."""
    tokens = jnp.concatenate([state.pending[:, None], state.drafts], axis=1)  # [b, k+1]
    base_logits, mask_hidden, cache = _forward(model, params, state.cache, state.length, pad_len, slot_valid,
                                               tokens, anchors, k)
    rng, r_verify, r_draft = jax.random.split(state.rng, 3)
    offered = jnp.where(speculate, state.n_drafts, 0)
    n, emitted = _verify(base_logits, state.drafts, offered, state.q, sampling, r_verify, lossy)
    # drafts from the block with the largest anchor offset s <= n
    anchor_arr = jnp.asarray(anchors)
    block = jnp.sum(anchor_arr[None] <= n[:, None], axis=1) - 1
    s = anchor_arr[block]
    hidden = jnp.take_along_axis(mask_hidden, block[:, None, None, None], axis=1)[:, 0]
    known = jnp.take_along_axis(emitted, jnp.clip(s[:, None] + jnp.arange(k), 0, k), axis=1)
    drafts, q, n_drafts = _draft(model, params, hidden, known, n + 1 - s, sampling, r_draft, state.q is not None)

    live = ~state.done
    idx = jnp.arange(k + 1)[None]
    is_eos = jnp.isin(emitted, eos_ids) & (idx <= n[:, None])
    count = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + 1, n + 1)
    count = jnp.minimum(count, max_new_tokens - state.n_out)
    n_out = state.n_out + jnp.where(live, count, 0)
    finished = live & (jnp.any(is_eos & (idx < count[:, None]), 1) | (n_out >= max_new_tokens))
    running = live & ~finished
    write = jax.vmap(lambda row, x, i: jax.lax.dynamic_update_slice_in_dim(row, x, i, axis=0))
    out = jnp.where(live[:, None], write(state.out, emitted, state.n_out), state.out)
    logits = None
    if state.logits is not None:
        logits = jnp.where(live[:, None, None], write(state.logits, base_logits, state.n_out), state.logits)
    keep = lambda new, old: jnp.where(running.reshape(-1, *[1] * (new.ndim - 1)), new, old)
    pos_k = jnp.arange(k)[None]
    return DecodeState(
        cache=cache,
        length=keep(state.length + n + 1, state.length),
        pending=keep(jnp.take_along_axis(emitted, n[:, None], 1)[:, 0], state.pending),
        drafts=keep(drafts, state.drafts),
        n_drafts=keep(n_drafts, state.n_drafts),
        q=None if q is None else keep(q, state.q),
        out=out,
        logits=logits,
        n_out=n_out,
        done=state.done | finished,
        steps=state.steps + live,
        accepted=state.accepted + (live[:, None] & (pos_k < n[:, None])),
        offered=state.offered + (live[:, None] & (pos_k < offered[:, None])),
        rng=rng,
    )


_STATIC = ("model", "max_new_tokens", "sampling", "k", "anchors", "lossy")


@functools.partial(jax.jit, static_argnames=_STATIC + ("keep_logits",))
def _decode(model, params, tokens, pad_len, eos_ids, rng, speculate, max_new_tokens, sampling, k, anchors, lossy,
            keep_logits):
    state, slot_valid = _prefill(model, params, tokens, pad_len, eos_ids, rng, max_new_tokens, sampling, k,
                                 len(anchors), lossy, keep_logits)
    body = lambda s: _step(model, params, s, pad_len, slot_valid, eos_ids, speculate, max_new_tokens, sampling, k,
                           anchors, lossy)
    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


def _steps(model, params, state: DecodeState, pad_len, slot_valid, eos_ids, speculate, max_new_tokens, sampling, k,
           anchors, lossy, calls):
    """Up to `calls` `_step`s, fewer once every row is done: one dispatch from the host and one read of
    the tokens for several model calls (a streaming caller's host work per call is shared)."""
    body = lambda c: (c[0] + 1, _step(model, params, c[1], pad_len, slot_valid, eos_ids, speculate,  # noqa: E731
                                      max_new_tokens, sampling, k, anchors, lossy))
    return jax.lax.while_loop(lambda c: (c[0] < calls) & ~jnp.all(c[1].done), body, (jnp.int32(0), state))[1]


_prefill_jit = jax.jit(_prefill, static_argnames=("model", "max_new_tokens", "sampling", "k", "blocks", "lossy",
                                                  "keep_logits"))
# the state (KV cache included) is donated: each call updates the previous call's buffers in place
steps_jit = jax.jit(_steps, static_argnames=_STATIC + ("calls",), donate_argnames=("state",))


def _inputs(model, params, prompts, max_new_tokens, eos_ids, sampling, pad_id, draft_length, anchors, lossy, exact):
    if not isinstance(model, MTPModel):
        raise TypeError(f"speculative decoding needs an MTPModel (base + adapters), got {type(model).__name__}")
    missing = {"base", "lora", "sampler", "mask_embedding"} - set(params)
    if missing:
        raise ValueError(f"params lack {sorted(missing)}: expected the flat dict of mtp.objective.init_params / "
                         "checkpoints.load_run")
    k, anchors = check_layout(model, draft_length, anchors)
    if lossy is not None and (sampling.temperature > 0 or not 0.0 <= lossy <= 1.0):
        raise ValueError(f"lossy threshold {lossy}: needs greedy decoding and a probability in [0, 1]")
    if lossy is not None and exact:
        raise ValueError("exact mode decodes the base model's own output; the lossy option gives that up")
    tokens, pad_len = check_request(prompts, max_new_tokens, eos_ids, pad_id, model.config.max_position_embeddings)
    return jnp.asarray(tokens), jnp.asarray(pad_len), jnp.asarray(list(eos_ids), jnp.int32), k, anchors


def _result(state: DecodeState) -> DecodeResult:
    out, n_out = np.asarray(state.out), np.asarray(state.n_out)
    logits = None
    if state.logits is not None:
        logits = [row[:n] for row, n in zip(np.asarray(state.logits.astype(jnp.float32)), n_out)]
    return DecodeResult([row[:n].tolist() for row, n in zip(out, n_out)], np.asarray(state.steps),
                        np.asarray(state.accepted), np.asarray(state.offered), logits)


def decode(model: MTPModel, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0,
           draft_length: int | None = None, anchors: Sequence[int] | None = None, lossy: float | None = None,
           speculate: bool = True, keep_logits: bool = False, exact: bool = False) -> DecodeResult:
    """`speculative_generate` with two more switches: `speculate=False` offers no drafts (each call
    emits the base model's next token: exact-mode plain decoding, in the speculative call's program);
    `keep_logits` also returns the base logits each emitted token came from (DecodeResult.logits)."""
    tokens, pad_len, eos, k, anchors = _inputs(model, params, prompts, max_new_tokens, eos_ids, sampling, pad_id,
                                               draft_length, anchors, lossy, exact)
    model, params = prepare(model, params)
    state = _decode(model, params, tokens, pad_len, eos, jax.random.key(seed), jnp.asarray(speculate),
                    max_new_tokens, sampling, k, anchors, lossy, keep_logits)
    return _result(state)


def speculative_generate(model: MTPModel, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0,
                         draft_length: int | None = None, anchors: Sequence[int] | None = None,
                         lossy: float | None = None, exact: bool = False) -> DecodeResult:
    """New tokens for each prompt (as `plain.generate`, same distribution), decoded with drafts.

    params: the flat dict {base, lora, sampler, mask_embedding}, best in the decoding layout
    (`layout.prepare`, which `adapter.load_adapter` returns); otherwise this call builds it first.
    draft_length: k to use (<= the adapter's). anchors: mask-block offsets (module docstring);
    default all of 0..k. lossy: LOSSY option, off by default: also accept drafts with sampler
    probability >= lossy (`_verify`). exact: the output equals `plain.generate(exact=True)` with
    the same k and anchors bit for bit in any dtype (module docstring); every call of this decoder
    is already in the exact-mode program, so the flag only refuses what is not exact (`lossy`).
    """
    return decode(model, params, prompts, max_new_tokens, eos_ids, sampling, seed, pad_id, draft_length, anchors,
                  lossy, exact=exact)


class StreamCall(NamedTuple):
    """One read of `speculative_calls` (after the prompt's call, then after each `calls_per_read` model
    calls): the tokens each row gained since the last read and the row's counters (as DecodeResult's)."""
    chunks: list[list[int]]
    steps: np.ndarray  # [batch] model calls while the row was running, up to this read
    accepted: np.ndarray  # [batch, k]
    offered: np.ndarray  # [batch, k]
    done: np.ndarray  # [batch] bool


def speculative_calls(model: MTPModel, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0,
                      draft_length: int | None = None, anchors: Sequence[int] | None = None,
                      lossy: float | None = None, calls_per_read: int = 1) -> Iterator[StreamCall]:
    """`speculative_generate`'s decoding as it goes: a StreamCall after the prompt's call, then after
    every `calls_per_read` model calls (fewer at the end), each run as one program with one read of
    its tokens, so that the host's work per read (dispatch, reading back, the caller's) is shared by
    that many calls. A caller that stops reading a row part-way (a server's stop string) has that
    row's counters up to the read; closing the generator stops decoding. These programs are not
    `speculative_generate`'s, so in bf16 the tokens are its only up to rounding (exact mode: use that)."""
    if calls_per_read < 1:
        raise ValueError(f"calls_per_read must be >= 1, got {calls_per_read}")
    tokens, pad_len, eos, k, anchors = _inputs(model, params, prompts, max_new_tokens, eos_ids, sampling, pad_id,
                                               draft_length, anchors, lossy, False)
    model, params = prepare(model, params)
    state, slot_valid = _prefill_jit(model, params, tokens, pad_len, eos, jax.random.key(seed), max_new_tokens,
                                     sampling, k, len(anchors), lossy)
    speculate = jnp.asarray(True)
    seen = np.zeros(len(prompts), np.int64)
    while True:  # one transfer for all that is read
        n_out, done, out, steps, accepted, offered = jax.device_get(
            (state.n_out, state.done, state.out, state.steps, state.accepted, state.offered))
        yield StreamCall([out[r, seen[r]:n_out[r]].tolist() for r in range(len(prompts))], steps, accepted,
                         offered, done)
        if done.all():
            return
        seen = n_out
        state = steps_jit(model, params, state, pad_len, slot_valid, eos, speculate, max_new_tokens, sampling, k,
                          anchors, lossy, calls_per_read)


def speculative_stream(model: MTPModel, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0,
                       draft_length: int | None = None, anchors: Sequence[int] | None = None,
                       lossy: float | None = None) -> Iterator[tuple[list[list[int]], DecodeResult | None]]:
    """Same tokens as `speculative_generate`, one model call at a time (`speculative_calls`): yields the
    tokens each row gained in the call (and, with the last, the DecodeResult)."""
    tokens = [[] for _ in prompts]
    for call in speculative_calls(model, params, prompts, max_new_tokens, eos_ids, sampling, seed, pad_id,
                                  draft_length, anchors, lossy):
        for row, chunk in zip(tokens, call.chunks):
            row.extend(chunk)
        yield call.chunks, (DecodeResult(tokens, call.steps, call.accepted, call.offered) if call.done.all() else None)
