"""Build (or check) the data cache ahead of training and print what it holds.

python -m mtp_jax.data --model smollm2-135m-instruct --draft_length 4 [--on_bad_record skip]
    [--rebuild_cache] [--data.train_file f.jsonl --data.max_total_tokens 4096 ...]

Prints per split the examples, anchors (response tokens) and tokens, in total and per record format
(input-output, messages, prompt-completion).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mtp_jax import cli
from mtp_jax.config import ConfigError, apply_overrides, from_dict
from mtp_jax.data.config import DataConfig
from mtp_jax.data.pipeline import prepare
from mtp_jax.models.loading import load_tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: the caches hold the data; 2: bad options or data (`error: ...`)."""
    return cli.run_main(_main, argv)


def _main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m mtp_jax.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="its tokenizer is used")
    ap.add_argument("--draft_length", type=int, default=4)
    ap.add_argument("--on_bad_record", choices=["error", "skip"], default=None)
    ap.add_argument("--rebuild_cache", action="store_true")
    args, rest = ap.parse_known_args(argv)
    overrides = {}
    apply_overrides(overrides, rest)
    data = overrides.pop("data", {})
    if overrides:
        raise ConfigError(f"unknown options {sorted(overrides)}; DataConfig fields go as --data.NAME VALUE")
    if args.on_bad_record:
        data["on_bad_record"] = args.on_bad_record
    if args.rebuild_cache:
        data["rebuild_cache"] = True
    cfg = from_dict(DataConfig, data, "data")
    tokenizer = load_tokenizer(args.model)
    for split in ("train", "eval"):
        if split == "eval" and cfg.eval_file is None:
            continue
        cache = prepare(cfg, tokenizer, args.draft_length, split)
        m = cache.manifest
        print(f"{split}: {m['examples']} examples, {m['anchors']} anchors, {m['tokens']} tokens, "
              f"{m['skipped']} bad records skipped, {m['truncated']} truncated, {m['multi_span']} multi-turn, "
              f"{cache.short_responses(args.draft_length)} with fewer anchors than k={args.draft_length}; "
              f"{'built' if cache.built else 'reused'} {cache.path}")
        for form, n in sorted(m["formats"].items()):
            print(f"  {form}: {n['examples']} examples, {n['anchors']} anchors, {n['tokens']} tokens")


if __name__ == "__main__":
    sys.exit(main())
