"""KV-cached generation in JAX: batched (left padding), greedy or sampled, stops on EOS.

Serves self-distillation data and is the baseline the speculative decoder is checked against.
`python -m mtp_jax.generate --model smollm2-135m-instruct --prompt "..."` runs it from the shell;
with `--adapter runs/x` (a training run) it decodes speculatively with the run's drafts
(`mtp_jax.decode`, same output), streaming text, and reports tokens per step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.models.llama import CausalLM
from mtp_jax.paths import absolute, absolute_file


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def cache_attend(index: jax.Array, slot_valid: jax.Array):
    """Attention over a KV cache; `layer_state` = this layer's (k, v) [batch, slots, kv_heads, head_dim].

    The new keys/values are written at slots [index, index + T); query t sits at slot index + t and
    sees valid slots <= its own. `slot_valid` [batch, slots] hides left padding. aux = the
    updated (k, v) of the layer (stacked by the decoder: the updated cache).
    """

    def attend(q, k, v, layer_state):
        k_cache, v_cache = layer_state
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        slots = jnp.arange(k_cache.shape[1])
        q_slots = index + jnp.arange(q.shape[1])
        mask = (slots[None, :] <= q_slots[:, None])[None, None] & slot_valid[:, None, None, :]
        out = jax.nn.dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask=mask)
        return out, (k_cache, v_cache)

    return attend


def init_cache(model: CausalLM, batch: int, slots: int) -> tuple[jax.Array, jax.Array]:
    """Empty (k, v) cache, each [layers, batch, slots, kv_heads, head_dim]."""
    c = model.config
    shape = (c.num_layers, batch, slots, c.num_kv_heads, c.head_dim)
    return jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Float32 logits [..., vocab] of the distribution `sampling` draws from: scaled by the
    temperature, with tokens outside top-k / the top-p nucleus at -inf (temperature > 0 only)."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # smallest logit still inside the nucleus (the top token always is)
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < sampling.top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[..., None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_token(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [..., vocab] -> token ids [...]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling"))
def _generate(model: CausalLM, variables: Any, tokens: jax.Array, pad_len: jax.Array, eos_ids: jax.Array,
              rng: jax.Array, max_new_tokens: int, sampling: Sampling):
    batch, prompt_len = tokens.shape
    slots = prompt_len + max_new_tokens
    slot_valid = jnp.arange(slots)[None, :] >= pad_len[:, None]
    positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_len[:, None], 0)

    def run(cache, toks, pos, index):
        hidden, cache = model.apply(variables, toks, pos, cache_attend(index, slot_valid), layer_state=cache)
        return model.apply(variables, hidden[:, -1], method=model.logits), cache

    logits, cache = run(init_cache(model, batch, slots), tokens, positions, 0)
    rng, sub = jax.random.split(rng)
    first = sample_token(logits, sub, sampling)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, out, done, rng = state
        prev = out[:, i - 1]
        pos = (prompt_len + i - 1 - pad_len)[:, None]
        logits, cache = run(cache, prev[:, None], pos, prompt_len + i - 1)
        rng, sub = jax.random.split(rng)
        tok = sample_token(logits, sub, sampling)
        tok = jnp.where(done, eos_ids[0], tok)
        return i + 1, cache, out.at[:, i].set(tok), done | jnp.isin(tok, eos_ids), rng

    n, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done, rng))
    return out, n


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] left-padded ids (length rounded up to limit recompiles) and pad counts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, length - len(p):] = p
    return tokens, np.asarray([length - len(p) for p in prompts], np.int32)


def check_request(prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                  max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """The checked request as `left_pad`'s (tokens, pad counts); ValueError names what is wrong."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not eos_ids:
        raise ValueError("eos_ids is empty; pass the tokenizer's EOS id")
    tokens, pad_len = left_pad(prompts, pad_id)
    if tokens.shape[1] + max_new_tokens > max_positions:
        raise ValueError(f"prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({max_positions})")
    return tokens, pad_len


def generate(model: CausalLM, variables: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             eos_ids: Sequence[int], sampling: Sampling = Sampling(), seed: int = 0, pad_id: int = 0
             ) -> list[list[int]]:
    """New tokens for each prompt, each list ending at (and including) its first EOS."""
    tokens, pad_len = check_request(prompts, max_new_tokens, eos_ids, pad_id, model.config.max_position_embeddings)
    if "params" not in variables:
        variables = {"params": variables}
    out, n = _generate(model, variables, jnp.asarray(tokens), jnp.asarray(pad_len),
                       jnp.asarray(list(eos_ids), jnp.int32), jax.random.key(seed), max_new_tokens, sampling)
    out = np.asarray(out)[:, : int(n)]
    results = []
    for row in out:
        hits = np.nonzero(np.isin(row, eos_ids))[0]
        results.append(row[: hits[0] + 1].tolist() if len(hits) else row.tolist())
    return results


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat and tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  return_dict=False))
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def eos_ids_of(tokenizer, config) -> list[int]:
    ids = list(config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_id_of(tokenizer, eos_ids: Sequence[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compile_seconds():
    """Yields a one-item list that accumulates the seconds JAX spends tracing and compiling in the block."""
    total = [0.0]

    def listener(event, duration, **_):
        if event in _COMPILE_EVENTS:
            total[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _stream_one(stream, tokenizer) -> tuple[list[int], Any]:
    """Prints a single row's text as the decoder emits it; returns its tokens and the final result."""
    tokens, printed, result = [], "", None
    for chunks, result in stream:
        tokens += chunks[0]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.startswith(printed) and not text.endswith("\ufffd"):  # hold back a split UTF-8 character
            print(text[len(printed):], end="", flush=True)
            printed = text
    print(tokenizer.decode(tokens, skip_special_tokens=True)[len(printed):] + "\n", flush=True)
    return tokens, result


def main(argv: Sequence[str] | None = None) -> None:
    from mtp_jax.checkpoints import CheckpointError
    from mtp_jax.data.readers import DataError, read_records
    from mtp_jax.models.loading import load_model, load_tokenizer

    ap = argparse.ArgumentParser(prog="python -m mtp_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir, .gguf file or alias (default: the adapter run's base, "
                                                  "else smollm2-135m-instruct)")
    ap.add_argument("--adapter", default=None, type=absolute, help="training run dir: decode speculatively with its MTP drafts")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of --adapter (default: latest)")
    ap.add_argument("--draft_length", type=int, default=None, help="drafts per step (default: the run's k)")
    ap.add_argument("--anchors", default=None, help="mask-block offsets, e.g. '0' (default: all of 0..k)")
    ap.add_argument("--lossy", type=float, default=None,
                    help="LOSSY, ConfAdapt-style: also accept drafts whose sampler probability is >= this where the "
                         "base model disagrees; the output is then NOT the model's greedy output (greedy only)")
    ap.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    ap.add_argument("--prompts", type=absolute_file, help='JSON/JSONL file of {"input": ...} records (builtin:NAME for shipped ones)')
    ap.add_argument("--batch_size", type=int, default=1, help="prompts decoded together (1: streamed)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None, help="compute dtype (default float32, or the run's)")
    ap.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    args = ap.parse_args(argv)
    if args.adapter is None and (args.step, args.draft_length, args.anchors, args.lossy) != (None,) * 4:
        ap.error("--step, --draft_length, --anchors and --lossy need --adapter")
    if args.batch_size < 1:
        ap.error("--batch_size must be >= 1")
    try:
        texts = list(args.prompt or [])
        if args.prompts:
            texts += [r.input for r in read_records(args.prompts, require_output=False)]
        texts = texts or ["Write a Python function that checks whether a number is prime."]
        empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"prompt(s) {empty} are empty")
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        if args.adapter:
            from mtp_jax.decode import load_adapter, speculative_generate, speculative_stream

            model, params, tokenizer = load_adapter(args.adapter, args.model, args.step, args.dtype)
            config = model.config
        else:
            path = args.model or "smollm2-135m-instruct"
            model, params, config = load_model(path, dtype=args.dtype or "float32")
            tokenizer = load_tokenizer(path)
        ids = [encode_prompt(tokenizer, p, not args.raw) for p in texts]
        eos = eos_ids_of(tokenizer, config)
        pad_id = pad_id_of(tokenizer, eos)
        anchors = None if args.anchors is None else [int(a) for a in args.anchors.split(",")]
        spec = dict(draft_length=args.draft_length, anchors=anchors, lossy=args.lossy)
        n_tokens, steps, accepted, offered = 0, 0, 0, 0
        t0 = time.perf_counter()
        with compile_seconds() as compiling:
            for start in range(0, len(ids), args.batch_size):
                batch, batch_texts = ids[start:start + args.batch_size], texts[start:start + args.batch_size]
                seed = args.seed + start
                if args.adapter and len(batch) == 1:
                    print(f">>> {batch_texts[0]}", flush=True)
                    out, result = _stream_one(speculative_stream(model, params, batch, args.max_new_tokens, eos,
                                                                 sampling, seed, pad_id, **spec), tokenizer)
                    outs = [out]
                else:
                    if args.adapter:
                        result = speculative_generate(model, params, batch, args.max_new_tokens, eos, sampling, seed,
                                                      pad_id, **spec)
                        outs = result.tokens
                    else:
                        outs = generate(model, params, batch, args.max_new_tokens, eos, sampling, seed, pad_id)
                    for prompt, out in zip(batch_texts, outs):
                        print(f">>> {prompt}\n{tokenizer.decode(out, skip_special_tokens=True)}\n", flush=True)
                n_tokens += sum(map(len, outs))
                if args.adapter:
                    steps += int(result.steps.sum())
                    accepted, offered = accepted + result.accepted.sum(0), offered + result.offered.sum(0)
    except (CheckpointError, DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    elapsed = time.perf_counter() - t0
    run_s = max(elapsed - compiling[0], 1e-9)
    line = f"[{n_tokens} tokens in {elapsed:.2f}s: {n_tokens / run_s:.1f} tokens/s without the {compiling[0]:.1f}s " \
           "of compilation"
    if args.adapter:
        rates = " ".join(f"{a / max(o, 1):.2f}" for a, o in zip(accepted, offered))
        line += f"; {n_tokens / max(steps, 1):.2f} tokens/step; drafts accepted by position: {rates}"
    print(line + "]", file=sys.stderr)


if __name__ == "__main__":
    main()
