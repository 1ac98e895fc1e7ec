"""Plain KV-cached generation: batched (left padding), greedy or sampled, stops on EOS.

Serves self-distillation data and is the baseline the speculative decoder is checked against. It
runs over the decoding layout (`layout.prepare`: unstacked layers, per-layer cache buffers updated
in place). `plain_calls` yields the same decoding one call at a time (a server's plain mode, the
baseline of its speculative one). `exact=True` decodes greedily through the speculative decoder's
own call program with verification off (`speculative` module docstring): bf16 output that speculative decoding then
reproduces bit for bit, at the cost of a speculative call per token.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.decoding import speculative
from mtp_jax.decoding.cache import cache_attend, init_cache
from mtp_jax.decoding.layout import prepare
from mtp_jax.decoding.request import check_request
from mtp_jax.decoding.sampling import Sampling, sample_token
from mtp_jax.decoding.speculative import StreamCall
from mtp_jax.models.llama import CausalLM
from mtp_jax.mtp.model import MTPModel


class PlainState(NamedTuple):
    cache: tuple  # per layer (k, v) [batch, slots, kv_heads, head_dim]
    last: jax.Array  # [b] the newest token, not yet in the cache
    n: jax.Array  # [] tokens emitted per row so far (the rows step together)
    done: jax.Array  # [b] the row has emitted an EOS
    rng: jax.Array


def _apply(model, params, slot_valid, cache, toks, pos, index):
    variables = {"params": params}
    hidden, cache = model.apply(variables, toks, pos, cache_attend(index, slot_valid), layer_state=cache)
    return model.apply(variables, hidden[:, -1], method=model.logits), cache


def _prefill(model: CausalLM, params: Any, tokens: jax.Array, pad_len: jax.Array, eos_ids: jax.Array,
             rng: jax.Array, max_new_tokens: int, sampling: Sampling):
    """The prompt's call: (state after its first token, slot_valid [b, slots], that token's logits)."""
    batch, prompt_len = tokens.shape
    slot_valid = jnp.arange(prompt_len + max_new_tokens)[None, :] >= pad_len[:, None]
    positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_len[:, None], 0)
    logits, cache = _apply(model, params, slot_valid, init_cache(model.config, batch, slot_valid.shape[1], model.dtype),
                           tokens, positions, 0)
    rng, sub = jax.random.split(rng)
    first = sample_token(logits, sub, sampling)
    return PlainState(cache, first, jnp.int32(1), jnp.isin(first, eos_ids), rng), slot_valid, logits


def _next(model: CausalLM, params: Any, state: PlainState, pad_len: jax.Array, slot_valid: jax.Array,
          eos_ids: jax.Array, max_new_tokens: int, sampling: Sampling):
    """One call on each row's newest token: (state after the next token, its logits). A finished row
    emits eos_ids[0] (callers drop it)."""
    prompt_len = slot_valid.shape[1] - max_new_tokens
    index = prompt_len + state.n - 1
    logits, cache = _apply(model, params, slot_valid, state.cache, state.last[:, None], (index - pad_len)[:, None],
                           index)
    rng, sub = jax.random.split(state.rng)
    tok = jnp.where(state.done, eos_ids[0], sample_token(logits, sub, sampling))
    return PlainState(cache, tok, state.n + 1, state.done | jnp.isin(tok, eos_ids), rng), logits


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "keep_logits"))
def _generate(model: CausalLM, params: Any, tokens: jax.Array, pad_len: jax.Array, eos_ids: jax.Array,
              rng: jax.Array, max_new_tokens: int, sampling: Sampling, keep_logits: bool = False):
    state, slot_valid, logits = _prefill(model, params, tokens, pad_len, eos_ids, rng, max_new_tokens, sampling)
    batch = tokens.shape[0]
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(state.last)
    kept = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), logits.dtype).at[:, 0].set(logits) \
        if keep_logits else None

    def cond(carry):
        state = carry[0]
        return (state.n < max_new_tokens) & ~jnp.all(state.done)

    def body(carry):
        state, out, kept = carry
        i = state.n
        state, logits = _next(model, params, state, pad_len, slot_valid, eos_ids, max_new_tokens, sampling)
        return state, out.at[:, i].set(state.last), None if kept is None else kept.at[:, i].set(logits)

    state, out, kept = jax.lax.while_loop(cond, body, (state, out, kept))
    return out, state.n, kept


def _next_calls(model: CausalLM, params: Any, state: PlainState, pad_len: jax.Array, slot_valid: jax.Array,
                eos_ids: jax.Array, max_new_tokens: int, sampling: Sampling, calls: int):
    """Up to `calls` `_next`s, fewer once every row is done or max_new_tokens are out: (the state after
    them, their tokens [b, calls]; columns past the last call and a finished row's tokens are eos_ids[0])."""
    toks = jnp.full((state.last.shape[0], calls), eos_ids[0], jnp.int32)

    def body(carry):
        i, state, toks = carry
        state, _ = _next(model, params, state, pad_len, slot_valid, eos_ids, max_new_tokens, sampling)
        return i + 1, state, toks.at[:, i].set(state.last)

    cond = lambda c: (c[0] < calls) & (c[1].n < max_new_tokens) & ~jnp.all(c[1].done)  # noqa: E731
    return jax.lax.while_loop(cond, body, (jnp.int32(0), state, toks))[1:]


_prefill_jit = jax.jit(_prefill, static_argnames=("model", "max_new_tokens", "sampling"))
# the state (KV cache included) is donated: each call updates the previous call's buffers in place
_next_calls_jit = jax.jit(_next_calls, static_argnames=("model", "max_new_tokens", "sampling", "calls"),
                          donate_argnames=("state",))


def plain_calls(model: CausalLM, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0,
                calls_per_read: int = 1) -> Iterator[StreamCall]:
    """`generate`'s decoding as it goes, as `speculative.speculative_calls` yields it (a server decodes
    with either): a StreamCall after the prompt's call, then after every `calls_per_read` calls (one
    token per running row each), one program and one read each. `steps` counts a row's calls while it
    ran, `accepted` / `offered` are [batch, 0] (no drafts). Closing the generator stops decoding."""
    if isinstance(model, MTPModel):
        raise TypeError("plain decoding takes the base CausalLM, got an MTPModel")
    if calls_per_read < 1:
        raise ValueError(f"calls_per_read must be >= 1, got {calls_per_read}")
    tokens, pad_len = check_request(prompts, max_new_tokens, eos_ids, pad_id, model.config.max_position_embeddings)
    model, params = prepare(model, params["params"] if "params" in params else params)
    pad_len, eos = jnp.asarray(pad_len), jnp.asarray(list(eos_ids), jnp.int32)
    state, slot_valid, _ = _prefill_jit(model, params, jnp.asarray(tokens), pad_len, eos, jax.random.key(seed),
                                        max_new_tokens, sampling)
    first = np.asarray(state.last)[:, None]
    done, n = np.zeros(len(prompts), bool), 0
    steps, none = np.zeros(len(prompts), np.int64), np.zeros((len(prompts), 0), np.int64)
    while True:
        chunks = [[] for _ in prompts]
        for column in first.T:  # the calls since the last read, one after another, as the device ran them
            if done.all():
                break
            running, n = ~done, n + 1
            for r in np.nonzero(running)[0]:
                chunks[r].append(int(column[r]))
            steps = steps + running
            done = done | np.isin(column, eos_ids) | (n >= max_new_tokens)
        yield StreamCall(chunks, steps, none, none, done)
        if done.all():
            return
        state, first = _next_calls_jit(model, params, state, pad_len, slot_valid, eos, max_new_tokens, sampling,
                                       calls_per_read)
        first = np.asarray(first)


def generate_with_logits(model: CausalLM | MTPModel, params: Any, prompts: Sequence[Sequence[int]],
                         max_new_tokens: int, eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0,
                         pad_id: int = 0, exact: bool = False, draft_length: int | None = None,
                         anchors: Sequence[int] | None = None) -> tuple[list[list[int]], list[np.ndarray]]:
    """`generate`'s tokens and, per row, the logits [len(tokens), vocab] (float32) each token came from."""
    return _run(model, params, prompts, max_new_tokens, eos_ids, sampling, seed, pad_id, exact, draft_length,
                anchors, keep_logits=True)


def generate(model: CausalLM | MTPModel, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0,
             exact: bool = False, draft_length: int | None = None, anchors: Sequence[int] | None = None
             ) -> list[list[int]]:
    """New tokens for each prompt, each list ending at (and including) its first EOS.

    model, params: a CausalLM and its base params, best in the decoding layout (`layout.prepare`;
    otherwise this call builds it first). exact: decode in the speculative call's program (module
    docstring); model and params are then the MTPModel's, and draft_length / anchors (as in
    `speculative.speculative_generate`) fix the call's shape: pass the speculative run's.
    """
    return _run(model, params, prompts, max_new_tokens, eos_ids, sampling, seed, pad_id, exact, draft_length,
                anchors, keep_logits=False)[0]


def _run(model, params, prompts, max_new_tokens, eos_ids, sampling, seed, pad_id, exact, draft_length, anchors,
         keep_logits):
    if exact:
        if not isinstance(model, MTPModel):
            raise TypeError("exact plain decoding runs the speculative call's program: pass the MTPModel and its "
                            f"params, got {type(model).__name__}")
        res = speculative.decode(model, params, prompts, max_new_tokens, eos_ids, sampling, seed, pad_id,
                                 draft_length, anchors, speculate=False, keep_logits=keep_logits, exact=True)
        return res.tokens, res.logits
    if isinstance(model, MTPModel):
        raise TypeError("plain decoding takes the base CausalLM (or exact=True with the MTPModel)")
    if draft_length is not None or anchors is not None:
        raise ValueError("draft_length and anchors set the exact mode's call shape: they need exact=True")
    tokens, pad_len = check_request(prompts, max_new_tokens, eos_ids, pad_id, model.config.max_position_embeddings)
    model, params = prepare(model, params["params"] if "params" in params else params)
    out, n, kept = _generate(model, params, jnp.asarray(tokens), jnp.asarray(pad_len),
                             jnp.asarray(list(eos_ids), jnp.int32), jax.random.key(seed), max_new_tokens, sampling,
                             keep_logits)
    out = np.asarray(out)[:, : int(n)]
    kept = None if kept is None else np.asarray(kept.astype(jnp.float32))
    results, logits = [], []
    for row, o in enumerate(out):
        hits = np.nonzero(np.isin(o, eos_ids))[0]
        results.append(o[: hits[0] + 1].tolist() if len(hits) else o.tolist())
        if kept is not None:
            logits.append(kept[row, :len(results[-1])])
    return results, (logits if kept is not None else None)
