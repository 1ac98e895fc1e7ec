"""Serve a training run's adapters over HTTP in OpenAI's schema:

    python -m mtp_jax.serve --adapter runs/smollm2_k4 [--port 8000] [--max_batch 8]

then POST to /v1/chat/completions or /v1/completions (`"stream": true` for server-sent events) and
GET /v1/models. Output is the base model's own (speculative decoding is lossless); each response's
`usage` adds `tokens_per_call` and the per-draft-position `acceptance` of that request.
`--decoding plain` serves the same API with plain decoding of the run's base model alone (one token
per model call, no drafts, no `acceptance`): the baseline the speculative server is measured against.
Before answering it compiles its programs for greedy prompts up to `--precompile` tokens (every batch
size), so that requests do not wait for compiles.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mtp_jax import cli
from mtp_jax.checkpoints import CheckpointError
from mtp_jax.paths import absolute, absolute_if_local


def build_app(adapter, model: str | None = None, step: int | None = None, dtype: str | None = None,
              max_batch: int = 8, batch_wait_s: float = 0.002, default_max_tokens: int = 256,
              model_id: str | None = None, decoding: str = "speculative", precompile: int = 0,
              batch_sizes: Sequence[int] | None = None, calls_per_read: int = 1, draft_vocab: int | None = None):
    """The FastAPI app serving the run at `adapter` (loaded here; the decoding layout built once):
    `decoding` "speculative" with its drafts, or "plain" with its base model alone. `precompile` > 0:
    compile every batch size's programs for greedy prompts up to that many tokens first
    (`Batcher.warm_up`). `batch_sizes`: the row counts batches pad to (`batcher.batch_sizes_of`);
    `calls_per_read`: model calls between two reads of their tokens (`Batcher`). `draft_vocab` N > 0
    (speculative): drafts from the run's N most frequent response tokens only; None: `adapter.load_adapter`'s
    default."""
    from mtp_jax.decoding.adapter import load_adapter, load_base
    from mtp_jax.decoding.request import eos_ids_of, pad_id_of
    from mtp_jax.serve.app import create_app
    from mtp_jax.serve.batcher import Batcher

    if decoding not in ("speculative", "plain"):
        raise ValueError(f"decoding {decoding!r}: expected 'speculative' or 'plain'")
    if decoding == "speculative":
        lm, params, tokenizer = load_adapter(adapter, model, step, dtype, draft_vocab)
    else:
        lm, params, tokenizer = load_base(adapter, model, step, dtype)
    eos = eos_ids_of(tokenizer, lm.config)
    batcher = Batcher(lm, params, tokenizer, eos, pad_id_of(tokenizer, eos), max_batch, batch_wait_s, decoding,
                      min(default_max_tokens, lm.config.max_position_embeddings - 1), batch_sizes, calls_per_read)
    if precompile:
        batcher.warm_up(precompile)
    return create_app(batcher, model_id or absolute(adapter).name, default_max_tokens)


def _int_list(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def _main(argv: list[str]) -> None:
    from mtp_jax.decoding.adapter import DRAFT_VOCAB_DEFAULT

    ap = argparse.ArgumentParser(prog="python -m mtp_jax.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, type=absolute, help="training run dir whose MTP drafts decode")
    ap.add_argument("--decoding", choices=("speculative", "plain"), default="speculative",
                    help="speculative (the run's drafts) or plain (its base model alone, the baseline)")
    ap.add_argument("--draft_vocab", type=int, default=None, metavar="N",
                    help="speculative: draft from the N token ids most frequent in the run's training responses "
                         f"only: fewer bytes a call, same output (default: {DRAFT_VOCAB_DEFAULT}; 0: the whole "
                         "vocabulary)")
    ap.add_argument("--model", default=None, type=absolute_if_local,
                    help="another copy of the run's base model (HF dir, .gguf, alias or hub id; default: the run's)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of --adapter (default: latest)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the run's)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max_batch", type=int, default=8, help="requests decoded together at most")
    ap.add_argument("--batch_sizes", type=_int_list, default=None, metavar="N,N,...",
                    help="row counts a batch is padded to, the largest --max_batch (default: powers of two up to "
                         "--max_batch, and --max_batch); fewer sizes, fewer programs to compile")
    ap.add_argument("--calls_per_read", type=int, default=4, metavar="N",
                    help="model calls the engine runs between two reads of their tokens: the host's work per read "
                         "(dispatch, read-back, detokenizing) is shared by N calls; streams come N calls at a time")
    ap.add_argument("--batch_wait_ms", type=float, default=2.0,
                    help="how long the engine waits for more requests before it starts a batch")
    ap.add_argument("--max_tokens", type=int, default=256, help="token limit of a request that names none")
    ap.add_argument("--served_model_name", default=None, help="the model id clients use (default: the run dir's name)")
    ap.add_argument("--precompile", type=int, default=256, metavar="TOKENS",
                    help="before serving, compile the programs of every batch size for greedy prompts up to this "
                         "many tokens, so that no request waits for a compile (0: compile on first use)")
    ap.add_argument("--compile_cache", default=None, type=absolute,
                    help="JAX's persistent compilation cache dir: a restarted server loads its programs from it")
    args = ap.parse_args(argv)
    if min(args.max_batch, args.max_tokens, args.calls_per_read) < 1 or min(args.batch_wait_ms, args.precompile,
                                                                            args.draft_vocab or 0) < 0:
        ap.error("--max_batch, --max_tokens and --calls_per_read must be >= 1, --batch_wait_ms, --precompile and "
                 "--draft_vocab >= 0")
    if args.draft_vocab and args.decoding == "plain":
        ap.error("--draft_vocab drafts; --decoding plain has no drafts")
    from mtp_jax.serve.batcher import batch_sizes_of

    try:  # before the model loads
        batch_sizes_of(args.max_batch, args.batch_sizes)
    except ValueError as e:
        ap.error(f"--batch_sizes: {e}")
    if args.dtype is not None:
        import jax.numpy as jnp

        try:
            jnp.dtype(args.dtype)
        except TypeError:
            ap.error(f"--dtype {args.dtype}: not a dtype (e.g. bfloat16, float32)")
    import uvicorn

    if args.compile_cache is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache))
    app = build_app(args.adapter, args.model, args.step, args.dtype, args.max_batch, args.batch_wait_ms / 1000,
                    args.max_tokens, args.served_model_name, args.decoding, args.precompile, args.batch_sizes,
                    args.calls_per_read, args.draft_vocab)
    uvicorn.run(app, host=args.host, port=args.port)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: served until stopped; 2: bad input (flags, model, adapter run), one `error:` line."""
    return cli.run_main(_main, argv, errors=(CheckpointError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
