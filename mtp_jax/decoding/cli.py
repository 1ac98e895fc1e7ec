"""Decode from the shell: `python -m mtp_jax.decoding --model smollm2-135m-instruct --prompt "..."`
(also `python -m mtp_jax.generate`). With `--adapter runs/x` (a training run) it decodes
speculatively with the run's drafts (same output), streaming text, and reports tokens per step.

XLA's command buffers (CUDA graphs on a GPU) and fusion are XLA's settings, not this package's: set
them for a run through XLA_FLAGS, e.g. `XLA_FLAGS=--xla_gpu_enable_command_buffer=` (off) or
`--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL` (what to
capture), before JAX starts.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any, Sequence

import jax

from mtp_jax import cli
from mtp_jax.checkpoints import CheckpointError
from mtp_jax.data.readers import read_records
from mtp_jax.decoding.adapter import DRAFT_VOCAB_DEFAULT, MERGED_DEFAULT, load_adapter
from mtp_jax.decoding.layout import prepare
from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.request import encode_prompt, eos_ids_of, pad_id_of
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.decoding.speculative import speculative_generate, speculative_stream
from mtp_jax.models.loading import load_model, load_tokenizer
from mtp_jax.paths import absolute, absolute_file

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


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: done; 2: bad input (flags, prompts, model, adapter run), one `error:` line on stderr."""
    return cli.run_main(_main, argv, errors=(CheckpointError, ValueError))  # ValueError: a bad request or prompt


def _main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m mtp_jax.decoding", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir, .gguf file or alias (default: the adapter run's base, "
                                                  "else smollm2-135m-instruct)")
    ap.add_argument("--adapter", default=None, type=absolute, help="training run dir: decode speculatively with its MTP drafts")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of --adapter (default: latest)")
    ap.add_argument("--draft_length", type=int, default=None, help="drafts per step (default: the run's k)")
    ap.add_argument("--anchors", default=None, help="mask-block offsets, e.g. '0' (default: all of 0..k)")
    ap.add_argument("--draft_vocab", type=int, default=None, metavar="N",
                    help="draft from the N token ids most frequent in the run's training responses only: fewer "
                         f"bytes a call, same output (default: {DRAFT_VOCAB_DEFAULT}; 0: the whole vocabulary)")
    ap.add_argument("--merged", action=argparse.BooleanOptionalAction, default=None,
                    help="the merged decoding layout: one matmul per projection, twice the adapted kernels' bytes "
                         f"(default: {MERGED_DEFAULT}, whose calls are bound by their kernel count)")
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
    if args.adapter is None and ((args.step, args.draft_length, args.anchors, args.lossy, args.merged) != (None,) * 5
                                 or args.draft_vocab):
        ap.error("--step, --draft_length, --anchors, --draft_vocab, --merged and --lossy need --adapter")
    if (args.draft_vocab or 0) < 0:
        ap.error("--draft_vocab must be >= 0")
    if args.batch_size < 1:
        ap.error("--batch_size must be >= 1")
    texts = list(args.prompt or [])
    if args.prompts:
        texts += [r.input for r in read_records(args.prompts, require_output=False)]
    texts = texts or ["Write a Python function that checks whether a number is prime."]
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"prompt(s) {empty} are empty")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.adapter:
        model, params, tokenizer = load_adapter(args.adapter, args.model, args.step, args.dtype, args.draft_vocab,
                                                args.merged)
        config = model.config
    else:
        path = args.model or "smollm2-135m-instruct"
        model, params, config = load_model(path, dtype=args.dtype or "float32")
        model, params = prepare(model, params)
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
    elapsed = time.perf_counter() - t0
    run_s = max(elapsed - compiling[0], 1e-9)
    line = f"[{n_tokens} tokens in {elapsed:.2f}s: {n_tokens / run_s:.1f} tokens/s without the {compiling[0]:.1f}s " \
           "of compilation"
    if args.adapter:
        rates = " ".join(f"{a / max(o, 1):.2f}" for a, o in zip(accepted, offered))
        line += f"; {n_tokens / max(steps, 1):.2f} tokens/step; drafts accepted by position: {rates}"
        if "draft_vocab" in params:
            line += f"; drafts from {len(params['draft_vocab'])} token ids"
    print(line + "]", file=sys.stderr)

