"""Self-distillation data: the base model answers a file of prompts, giving {"input", "output"} records.

`python -m mtp_jax.data.distill --model smollm2-135m-instruct --prompts prompts.jsonl --out data.jsonl`
Resumable: each prompt has a key (its "id", else record number + text hash); finished records are
appended with flush + fsync, a rerun skips keys already in `--out` and cuts a torn last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from mtp_jax import cli
from mtp_jax.data.readers import DataError, Record, read_records
from mtp_jax.decoding.layout import prepare
from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.request import encode_prompt, eos_ids_of, pad_id_of
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.models.loading import load_model, load_tokenizer
from mtp_jax.paths import absolute, absolute_file


@dataclasses.dataclass
class DistillStats:
    prompts: int = 0
    already_done: int = 0
    generated: int = 0
    new_tokens: int = 0
    hit_length_limit: int = 0
    seconds: float = 0.0


def prompt_key(record: Record) -> str:
    if record.id:
        return record.id
    return f"{record.number}-{hashlib.sha1(record.input.encode()).hexdigest()[:12]}"


def load_done(out_path: Path) -> dict[str, str]:
    """{key: input} of the complete records in `out_path`; a torn last line is cut off the file."""
    done: dict[str, str] = {}
    if not out_path.exists():
        return done
    good_end = 0
    with open(out_path, "rb+") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                done[rec["id"]] = rec["input"]
            except (ValueError, KeyError, TypeError):
                if f.tell() != os.fstat(f.fileno()).st_size:
                    raise DataError(f"{out_path}: damaged line before the end at byte {good_end}; "
                                    "not a file written by distill") from None
                cli.log("distill", f"cutting a torn last line of {out_path} at byte {good_end}")
                f.truncate(good_end)
                break
            good_end += len(raw)
    return done


def run_distill(model, params, model_config, tokenizer, prompts_path, out_path, *, max_new_tokens: int = 256,
                batch_size: int = 16, sampling=None, seed: int = 0, chat: bool = True, limit: int | None = None,
                progress: bool = True) -> DistillStats:
    """Generates the missing responses of `prompts_path` into `out_path` (JSONL, appended)."""
    sampling = sampling or Sampling()
    model, params = prepare(model, params)  # the decoding layout once, not per batch
    out_path = Path(out_path)
    records = list(read_records(prompts_path, require_output=False))[:limit]
    keys = [prompt_key(r) for r in records]
    if len(set(keys)) != len(keys):
        raise DataError(f"{prompts_path}: duplicate prompt ids")
    done = load_done(out_path)
    for r, k in zip(records, keys):
        if k in done and done[k] != r.input:
            raise DataError(f"{out_path}: record {k!r} was made from a different prompt; use a new --out file")
    pending = [(r, k) for r, k in zip(records, keys) if k not in done]
    stats = DistillStats(prompts=len(records), already_done=len(records) - len(pending))
    encoded = [(encode_prompt(tokenizer, r.input, chat), r, k) for r, k in pending]
    encoded.sort(key=lambda e: len(e[0]))  # similar lengths per batch: less left padding
    eos = eos_ids_of(tokenizer, model_config)
    pad_id = pad_id_of(tokenizer, eos)
    t0 = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(records), initial=stats.already_done, desc="distill", unit="prompt", disable=not progress)
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            outs = generate(model, params, [ids for ids, _, _ in chunk], max_new_tokens, eos, sampling,
                            seed=seed + chunk[0][1].number, pad_id=pad_id)
            lines = []
            for (ids, r, k), out in zip(chunk, outs):
                stopped = bool(out) and out[-1] in eos
                stats.hit_length_limit += not stopped
                stats.new_tokens += len(out)
                text = tokenizer.decode(out, skip_special_tokens=True).strip()
                lines.append(json.dumps({"id": k, "input": r.input, "output": text,
                                         "stop": "eos" if stopped else "length"}, ensure_ascii=False))
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
            stats.generated += len(chunk)
            bar.update(len(chunk))
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: every prompt answered; 2: bad options, model or prompts (`error: ...`)."""
    return cli.run_main(_main, argv, errors=(ValueError,))  # generation's bad settings and prompts


def _main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m mtp_jax.data.distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="HF dir, .gguf file or alias")
    ap.add_argument("--prompts", required=True, type=absolute_file, help='JSON/JSONL file of {"input": ...} (optional "id")')
    ap.add_argument("--out", required=True, type=absolute, help="JSONL output, appended to on reruns")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("--batch_size and --max_new_tokens must be >= 1")
    model, params, config = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    stats = run_distill(model, params, config, tokenizer, args.prompts, args.out,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        sampling=Sampling(args.temperature, args.top_k, args.top_p), seed=args.seed,
                        chat=not args.raw, limit=args.limit)
    cli.log("distill", f"{stats.prompts} prompts: {stats.already_done} already done, {stats.generated} generated "
                       f"({stats.new_tokens} tokens, {stats.hit_length_limit} hit max_new_tokens) in "
                       f"{stats.seconds:.1f}s -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
