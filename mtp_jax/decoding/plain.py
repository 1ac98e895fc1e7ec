"""Plain KV-cached generation: batched (left padding), greedy or sampled, stops on EOS.

Serves self-distillation data and is the baseline the speculative decoder is checked against. It
runs over the decoding layout (`layout.prepare`: unstacked layers, per-layer cache buffers updated
in place). `exact=True` decodes greedily through the speculative decoder's own call program with
verification off (`speculative` module docstring): bf16 output that speculative decoding then
reproduces bit for bit, at the cost of a speculative call per token.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.decoding import speculative
from mtp_jax.decoding.cache import cache_attend, init_cache
from mtp_jax.decoding.layout import prepare
from mtp_jax.decoding.request import check_request
from mtp_jax.decoding.sampling import Sampling, sample_token
from mtp_jax.models.llama import CausalLM
from mtp_jax.mtp.model import MTPModel


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "keep_logits"))
def _generate(model: CausalLM, params: Any, tokens: jax.Array, pad_len: jax.Array, eos_ids: jax.Array,
              rng: jax.Array, max_new_tokens: int, sampling: Sampling, keep_logits: bool = False):
    batch, prompt_len = tokens.shape
    slots = prompt_len + max_new_tokens
    slot_valid = jnp.arange(slots)[None, :] >= pad_len[:, None]
    positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_len[:, None], 0)
    variables = {"params": params}

    def run(cache, toks, pos, index):
        hidden, cache = model.apply(variables, toks, pos, cache_attend(index, slot_valid), layer_state=cache)
        return model.apply(variables, hidden[:, -1], method=model.logits), cache

    logits, cache = run(init_cache(model.config, batch, slots, model.dtype), tokens, positions, 0)
    rng, sub = jax.random.split(rng)
    first = sample_token(logits, sub, sampling)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    kept = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), logits.dtype).at[:, 0].set(logits) \
        if keep_logits else None
    done = jnp.isin(first, eos_ids)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, out, kept, done, rng = state
        prev = out[:, i - 1]
        pos = (prompt_len + i - 1 - pad_len)[:, None]
        logits, cache = run(cache, prev[:, None], pos, prompt_len + i - 1)
        rng, sub = jax.random.split(rng)
        tok = sample_token(logits, sub, sampling)
        tok = jnp.where(done, eos_ids[0], tok)
        if kept is not None:
            kept = kept.at[:, i].set(logits)
        return i + 1, cache, out.at[:, i].set(tok), kept, done | jnp.isin(tok, eos_ids), rng

    n, _, out, kept, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, kept, done, rng))
    return out, n, kept


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
