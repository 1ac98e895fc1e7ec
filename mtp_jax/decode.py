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
top-k / top-p filter as `mtp_jax.generate`. One option gives that up:
`lossy=p` (ConfAdapt-style, off by default) also accepts drafts the sampler is at least p sure of.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.generate import Sampling, check_request, filter_logits, init_cache, sample_token
from mtp_jax.models.config import ModelConfig
from mtp_jax.models.lora import adapters_into_base, fuse_adapters
from mtp_jax.mtp.model import MTPModel
from mtp_jax.mtp.objective import Params, variables
from mtp_jax.paths import absolute


class DecodeState(NamedTuple):
    cache: tuple  # (k, v) [layers, batch, slots, kv_heads, head_dim]: regular tokens below `length`
    length: jax.Array  # [b] valid cache slots (prompt padding included)
    pending: jax.Array  # [b] t_0: emitted, not yet in the cache
    drafts: jax.Array  # [b, k] proposals for the tokens after t_0
    n_drafts: jax.Array  # [b] how many of `drafts` are real (k unless fewer mask blocks)
    q: jax.Array | None  # [b, k, vocab] draft distributions (sampling, or the lossy option)
    out: jax.Array  # [b, max_new + k + 1] emitted tokens
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


def spec_attend(length: jax.Array, slot_valid: jax.Array, n_regular: int, mask_anchor: np.ndarray,
                mask_step: np.ndarray):
    """Attention for one step: regular queries over the cache, mask blocks over cache + own block.

    `layer_state` = this layer's cache (k, v) [batch, slots, kv_heads, head_dim]. All R + M keys/values
    of the call are written to it at slots [length, length + R + M) per row (aux = the updated cache),
    so attention reads the cache alone, with no copy of it joined to the mask keys. Regular query i
    sees valid slots <= length + i; mask (s, j) sees valid slots <= length + s and the slots of masks
    (s, 1..j). The masks' slots lie past every slot a regular query sees, and the next call's write
    (at a length at most R further on) covers them again, so only regular tokens stay in the cache.
    """
    q_last = np.concatenate([np.arange(n_regular), mask_anchor])  # last cache slot each query sees, minus length
    # each mask sees the slots of its block's masks up to itself: [block start, own index] after the R regular
    m = np.arange(len(mask_anchor))
    block_start = m - (mask_step - 1)
    own_lo = np.concatenate([np.full(n_regular, 1), n_regular + block_start])  # regular queries: empty range
    own_hi = np.concatenate([np.zeros(n_regular, int), n_regular + m])
    write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))

    def attend(q, k, v, layer_state):
        k_cache, v_cache = layer_state
        k_cache = write(k_cache, k.astype(k_cache.dtype), length)
        v_cache = write(v_cache, v.astype(v_cache.dtype), length)
        rel = jnp.arange(k_cache.shape[1])[None, None, :] - length[:, None, None]  # [b, 1, slots]
        sees_cache = (rel <= q_last[None, :, None]) & slot_valid[:, None]
        sees_own = (rel >= own_lo[None, :, None]) & (rel <= own_hi[None, :, None])
        mask = (sees_cache | sees_own)[:, None]
        out = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask)
        return out, (k_cache, v_cache)

    return attend


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
    step_logits = lambda m, prev, h: m.base.logits(m.sampler(m.base.embed(prev), h))
    prev, drafts, qs = known[:, 0], [], []
    for j in range(k):
        logits = model.apply(variables(params), prev, hidden[:, j], method=step_logits)
        rng, sub = jax.random.split(rng)
        tok = sample_token(logits, sub, sampling)
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


def _verify(base_logits, drafts, n_drafts, q, sampling: Sampling, rng, lossy: float | None):
    """base_logits [b, k+1, V] at t_0, d_1..d_k -> (n accepted [b], emitted [b, k+1]: d_1..d_n, then
    the correction/bonus token at index n; entries after n are unused).

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


def _prefill(model, params, tokens, pad_len, eos_ids, rng, max_new_tokens, sampling, k, blocks, lossy):
    """Prompt call: fills the cache, emits the first token, drafts k from a mask block after the prompt.
    The cache holds the prompt, the new tokens and one step's k + 1 regular and `blocks` x k mask entries."""
    b, t = tokens.shape
    slots = t + max_new_tokens + k + blocks * k
    slot_valid = jnp.arange(slots)[None, :] >= pad_len[:, None]
    length = jnp.zeros((b,), jnp.int32)
    last, hidden, cache = _forward(model, params, init_cache(model, b, slots), length, pad_len, slot_valid, tokens,
                                   (t - 1,), k, last_only=True)
    rng, r_first, r_draft = jax.random.split(rng, 3)
    first = sample_token(last, r_first, sampling)
    known = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first)
    drafts, q, n_drafts = _draft(model, params, hidden[:, 0], known, jnp.ones((b,), jnp.int32), sampling, r_draft,
                                 sampling.temperature > 0 or lossy is not None)
    out = jnp.zeros((b, max_new_tokens + k + 1), jnp.int32).at[:, 0].set(first)
    zeros_k = jnp.zeros((b, k), jnp.int32)
    return DecodeState(cache, length + t, first, drafts, n_drafts, q, out, jnp.ones((b,), jnp.int32),
                       jnp.isin(first, eos_ids) | (max_new_tokens <= 1), jnp.ones((b,), jnp.int32), zeros_k,
                       zeros_k, rng), slot_valid


def _step(model, params, state: DecodeState, pad_len, slot_valid, eos_ids, max_new_tokens, sampling, k, anchors,
          lossy):
    """One verify-and-draft call for every row; finished rows keep their state."""
    tokens = jnp.concatenate([state.pending[:, None], state.drafts], axis=1)  # [b, k+1]
    base_logits, mask_hidden, cache = _forward(model, params, state.cache, state.length, pad_len, slot_valid,
                                               tokens, anchors, k)
    rng, r_verify, r_draft = jax.random.split(state.rng, 3)
    n, emitted = _verify(base_logits, state.drafts, state.n_drafts, state.q, sampling, r_verify, lossy)
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
        n_out=n_out,
        done=state.done | finished,
        steps=state.steps + live,
        accepted=state.accepted + (live[:, None] & (pos_k < n[:, None])),
        offered=state.offered + (live[:, None] & (pos_k < state.n_drafts[:, None])),
        rng=rng,
    )


_STATIC = ("model", "max_new_tokens", "sampling", "k", "anchors", "lossy")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode(model, params, tokens, pad_len, eos_ids, rng, max_new_tokens, sampling, k, anchors, lossy):
    state, slot_valid = _prefill(model, params, tokens, pad_len, eos_ids, rng, max_new_tokens, sampling, k,
                                 len(anchors), lossy)
    body = lambda s: _step(model, params, s, pad_len, slot_valid, eos_ids, max_new_tokens, sampling, k, anchors,
                           lossy)
    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


_prefill_jit = jax.jit(_prefill, static_argnames=("model", "max_new_tokens", "sampling", "k", "blocks", "lossy"))
_step_jit = jax.jit(_step, static_argnames=_STATIC, donate_argnames=("state",))


def _inputs(model, params, prompts, max_new_tokens, eos_ids, sampling, pad_id, draft_length, anchors, lossy):
    if not isinstance(model, MTPModel):
        raise TypeError(f"speculative decoding needs an MTPModel (base + adapters), got {type(model).__name__}")
    missing = {"base", "lora", "sampler", "mask_embedding"} - set(params)
    if missing:
        raise ValueError(f"params lack {sorted(missing)}: expected the flat dict of mtp.objective.init_params / "
                         "checkpoints.load_run")
    k, anchors = check_layout(model, draft_length, anchors)
    if lossy is not None and (sampling.temperature > 0 or not 0.0 <= lossy <= 1.0):
        raise ValueError(f"lossy threshold {lossy}: needs greedy decoding and a probability in [0, 1]")
    tokens, pad_len = check_request(prompts, max_new_tokens, eos_ids, pad_id, model.config.max_position_embeddings)
    return jnp.asarray(tokens), jnp.asarray(pad_len), jnp.asarray(list(eos_ids), jnp.int32), k, anchors


def _result(state: DecodeState) -> DecodeResult:
    out, n_out = np.asarray(state.out), np.asarray(state.n_out)
    return DecodeResult([row[:n].tolist() for row, n in zip(out, n_out)], np.asarray(state.steps),
                        np.asarray(state.accepted), np.asarray(state.offered))


def speculative_generate(model: MTPModel, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0,
                         draft_length: int | None = None, anchors: Sequence[int] | None = None,
                         lossy: float | None = None) -> DecodeResult:
    """New tokens for each prompt (as `generate.generate`, same distribution), decoded with drafts.

    params: the flat dict {base, lora, sampler, mask_embedding}. draft_length: k to use (<= the
    adapter's). anchors: mask-block offsets (module docstring); default all of 0..k. lossy: LOSSY
    option, off by default: also accept drafts with sampler probability >= lossy (`_verify`).
    """
    tokens, pad_len, eos, k, anchors = _inputs(model, params, prompts, max_new_tokens, eos_ids, sampling, pad_id,
                                               draft_length, anchors, lossy)
    model, params = for_decoding(model, params)
    state = _decode(model, params, tokens, pad_len, eos, jax.random.key(seed), max_new_tokens, sampling, k, anchors,
                    lossy)
    return _result(state)


def speculative_stream(model: MTPModel, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0,
                       draft_length: int | None = None, anchors: Sequence[int] | None = None,
                       lossy: float | None = None) -> Iterator[tuple[list[list[int]], DecodeResult | None]]:
    """Same tokens as `speculative_generate`, one model call at a time: yields the tokens each row
    gained in the call (and, with the last, the DecodeResult)."""
    tokens, pad_len, eos, k, anchors = _inputs(model, params, prompts, max_new_tokens, eos_ids, sampling, pad_id,
                                               draft_length, anchors, lossy)
    model, params = for_decoding(model, params)
    state, slot_valid = _prefill_jit(model, params, tokens, pad_len, eos, jax.random.key(seed), max_new_tokens,
                                     sampling, k, len(anchors), lossy)
    seen = np.zeros(len(prompts), np.int64)
    while True:
        n_out, done = np.asarray(state.n_out), np.asarray(state.done)
        out = np.asarray(state.out)
        yield [out[r, seen[r]:n_out[r]].tolist() for r in range(len(prompts))], (_result(state) if done.all() else None)
        if done.all():
            return
        seen = n_out
        state = _step_jit(model, params, state, pad_len, slot_valid, eos, max_new_tokens, sampling, k, anchors,
                          lossy)


class AdapterMismatchError(ValueError):
    """Adapters trained for another base model or vocabulary than the one asked for."""


# what an adapter's shapes and meaning depend on
_ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_word_embeddings", "qk_norm")


def check_architecture(trained: ModelConfig, config: ModelConfig, what: str) -> None:
    """Raises AdapterMismatchError unless `config` has the architecture the adapters were trained on."""
    differ = [f"{f} {getattr(trained, f)} vs {getattr(config, f)}" for f in _ARCHITECTURE
              if getattr(trained, f) != getattr(config, f)]
    if differ:
        raise AdapterMismatchError(f"{what}: the adapters were trained for another model ({'; '.join(differ)})")


def check_vocabulary(trained_tokenizer, mask_token: str, tokenizer, what: str) -> None:
    """Raises AdapterMismatchError unless `tokenizer` is the run's once its `<mask>` is set aside."""
    vocab = {t: i for t, i in trained_tokenizer.get_vocab().items() if t != mask_token}
    other = tokenizer.get_vocab()
    if vocab != other:
        changed = sorted(set(vocab.items()) ^ set(other.items()), key=lambda x: x[1])[:3]
        raise AdapterMismatchError(f"{what}: the adapters were trained with another vocabulary ({len(vocab)} vs "
                                   f"{len(other)} tokens; first differences {changed})")


def for_decoding(model: MTPModel, params: Params) -> tuple[MTPModel, Params]:
    """The same model in the decoding layout, which `speculative_generate` / `speculative_stream` build at
    the start of each call (a no-op on a model already in it): adapters fused (`lora.fuse_adapters`) and
    their A matrices carried in the base kernels that read the same inputs (`lora.adapters_into_base`).
    Identical output with 4 matmuls per layer for the adapters instead of 14 (a batch-1 decode step is
    bound by its number of kernels); the call holds new copies of the q, o, gate and down kernels.
    Every floating parameter is also cast to the compute dtype once, here: each use casts to it anyway
    (same values), and float32 adapters under bf16 compute otherwise cost 4 cast kernels per layer per call."""
    lora_cfg, lora = fuse_adapters(model.lora, params["lora"])
    lora_cfg, base, lora = adapters_into_base(lora_cfg, params["base"], lora)
    cast = lambda x: x.astype(model.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return model.clone(lora=lora_cfg), jax.tree.map(cast, {**params, "base": base, "lora": lora})


def load_adapter(run_dir, model_path: str | None = None, step: int | None = None, dtype: str | None = None):
    """(MTPModel, params, tokenizer with <mask>) to decode with a training run's adapters.

    The base is the run's own (`model.path` of its config) unless `model_path` names another copy of
    it, which is checked against the run (architecture and vocabulary) first.
    """
    from mtp_jax.checkpoints import load_run
    from mtp_jax.models import load_model, load_tokenizer
    from mtp_jax.models.loading import resolve_model_dir

    run_dir = absolute(run_dir)
    if model_path is None:
        run = load_run(run_dir, step, dtype=dtype)
        return run.model, jax.device_put(run.params), run.tokenizer  # numpy leaves would be copied per call
    run = load_run(run_dir, step, load_base=False, dtype=dtype)
    m = run.model
    what = f"--adapter {run_dir} (trained on {run.config.model.path}) with --model {model_path}"
    check_architecture(m.config, ModelConfig.from_file(resolve_model_dir(model_path) / "config.json"), what)
    check_vocabulary(run.tokenizer, run.config.mtp.mask_token, load_tokenizer(model_path), what)
    _, base, config = load_model(model_path, jnp.dtype(m.dtype).name, jnp.dtype(m.param_dtype).name)
    if resolve_model_dir(model_path) != resolve_model_dir(run.config.model.path):
        warnings.warn(f"{what}: same architecture and vocabulary, but a different checkpoint; drafts may be "
                      "accepted less often (output is still exactly this model's)")
    params = jax.device_put({**run.params, "base": base})
    return MTPModel(config, m.lora, m.mtp, m.dtype, m.param_dtype), params, run.tokenizer
