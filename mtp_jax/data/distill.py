"""Self-distillation data: the base model answers a file of prompts, giving training records.

`python -m mtp_jax.data.distill --model smollm2-135m-instruct --prompts prompts.jsonl --out data.jsonl`
A prompt is any record the readers take, answer optional: {"input"} gives {"input", "output"}; a
conversation ({"messages"}, or prompt-completion message lists) gets its last assistant turn
regenerated (a new one when it ends with a user turn), or with `--all_turns` every assistant turn in
order, each answering the conversation as regenerated so far; it is written back in its own form.
Resumable: each prompt has a key (its "id", else record number + a hash of the kept turns); finished
records are appended with flush + fsync, a rerun skips keys already in `--out` and cuts a torn last line.
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
from mtp_jax.data.readers import read_records
from mtp_jax.data.records import DataError, Message, Record, parse_record
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
    generated: int = 0  # records
    turns: int = 0  # assistant turns generated
    new_tokens: int = 0
    hit_length_limit: int = 0  # turns
    seconds: float = 0.0


def targets(record: Record, all_turns: bool) -> tuple[list[Message], list[int]]:
    """(the conversation to start from, the indices of the assistant turns to generate into it)."""
    messages = list(record.messages)
    if all_turns:
        turns = list(record.response_turns)
    else:
        turns = [len(messages) - 1] if messages[-1].role == "assistant" and record.response_turns else []
    if messages[-1].role != "assistant" or not turns:
        turns.append(len(messages))  # a conversation ending with a user turn gets a new answer
    return messages, turns


def identity(record: Record, all_turns: bool) -> str:
    """What the generated record keeps of its prompt: the input text, or the turns not regenerated."""
    if record.is_pair:
        return record.input
    _, turns = targets(record, all_turns)
    return json.dumps([m for i, m in enumerate(record.messages) if i not in turns], ensure_ascii=False)


def prompt_key(record: Record, all_turns: bool = False) -> str:
    if record.id:
        return record.id
    return f"{record.number}-{hashlib.sha1(identity(record, all_turns).encode()).hexdigest()[:12]}"


def output_record(record: Record, messages: list[Message], key: str, stop: str) -> dict:
    """The distilled record in the prompt's own form (an input-only prompt gives {"input", "output"})."""
    if record.is_pair:
        names = ("prompt", "completion") if record.form == "prompt-completion" else ("input", "output")
        return {"id": key, names[0]: messages[0].content, names[1]: messages[-1].content, "stop": stop}
    turns = [m._asdict() for m in messages]
    if record.form == "prompt-completion":
        first = record.first_response
        return {"id": key, "prompt": turns[:first], "completion": turns[first:], "stop": stop}
    return {"id": key, "messages": turns, "stop": stop}


def load_done(out_path: Path) -> dict[str, Record]:
    """{key: record} of the complete records in `out_path`; a torn last line is cut off the file."""
    done: dict[str, Record] = {}
    if not out_path.exists():
        return done
    good_end = 0
    with open(out_path, "rb+") as f:
        for number, raw in enumerate(f, 1):
            try:
                rec = json.loads(raw)
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                done[rec["id"]] = parse_record(rec, number, number, f"line {number}", f"{out_path}: line {number}",
                                               True)
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
                progress: bool = True, all_turns: bool = False) -> DistillStats:
    """Generates the missing records of `prompts_path` into `out_path` (JSONL, appended)."""
    sampling = sampling or Sampling()
    model, params = prepare(model, params)  # the decoding layout once, not per batch
    out_path = Path(out_path)
    records = list(read_records(prompts_path, require_output=False))[:limit]
    for r in records:
        if not r.is_pair and not (chat and tokenizer.chat_template):
            raise DataError(f"{prompts_path}: {r.where}: a conversation needs the tokenizer's chat template; drop "
                            "--raw, or give {\"input\"} prompts")
    keys = [prompt_key(r, all_turns) for r in records]
    if len(set(keys)) != len(keys):
        raise DataError(f"{prompts_path}: duplicate prompt ids")
    done = load_done(out_path)
    for r, k in zip(records, keys):
        if k in done and identity(done[k], all_turns) != identity(r, all_turns):
            raise DataError(f"{out_path}: record {k!r} was made from a different prompt; use a new --out file")
    pending = [(r, k) for r, k in zip(records, keys) if k not in done]
    stats = DistillStats(prompts=len(records), already_done=len(records) - len(pending))

    def encode(r: Record, messages: list[Message]) -> list[int]:
        if r.is_pair:
            return encode_prompt(tokenizer, messages[0].content, chat)
        return list(tokenizer.apply_chat_template([m._asdict() for m in messages], add_generation_prompt=True,
                                                  return_dict=False))

    def first_prompt(r: Record) -> list[int]:
        messages, turns = targets(r, all_turns)
        return encode(r, messages[:turns[0]])

    pending.sort(key=lambda e: len(first_prompt(e[0])))  # similar lengths per batch: less left padding
    eos = eos_ids_of(tokenizer, model_config)
    pad_id = pad_id_of(tokenizer, eos)
    t0 = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(records), initial=stats.already_done, desc="distill", unit="prompt", disable=not progress)
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            convs = [targets(r, all_turns) for r, _ in chunk]
            stops = ["eos"] * len(chunk)
            for step in range(max(len(turns) for _, turns in convs)):  # the t-th generated turn of each record
                rows = [n for n, (_, turns) in enumerate(convs) if step < len(turns)]
                prompts = [encode(chunk[n][0], convs[n][0][:convs[n][1][step]]) for n in rows]
                outs = generate(model, params, prompts, max_new_tokens, eos, sampling,
                                seed=seed + chunk[0][0].number + step, pad_id=pad_id)
                for n, out in zip(rows, outs):
                    stopped = bool(out) and out[-1] in eos
                    stats.hit_length_limit += not stopped
                    stats.new_tokens += len(out)
                    stats.turns += 1
                    stops[n] = stops[n] if stopped else "length"
                    messages, turns = convs[n]
                    answer = Message("assistant", tokenizer.decode(out, skip_special_tokens=True).strip())
                    at = turns[step]
                    messages[at:at + 1] = [answer]  # replaces the turn, or appends at the end
            lines = [json.dumps(output_record(r, convs[n][0], k, stops[n]), ensure_ascii=False)
                     for n, (r, k) in enumerate(chunk)]
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
    ap.add_argument("--prompts", required=True, type=absolute_file,
                    help='a data file of {"input"}, {"messages"} or {"prompt"} records (optional "id")')
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
    ap.add_argument("--all_turns", action="store_true",
                    help="regenerate every assistant turn of a conversation, not only the last")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("--batch_size and --max_new_tokens must be >= 1")
    model, params, config = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    stats = run_distill(model, params, config, tokenizer, args.prompts, args.out,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        sampling=Sampling(args.temperature, args.top_k, args.top_p), seed=args.seed,
                        chat=not args.raw, limit=args.limit, all_turns=args.all_turns)
    cli.log("distill", f"{stats.prompts} prompts: {stats.already_done} already done, {stats.generated} generated "
                       f"({stats.turns} turns, {stats.new_tokens} tokens, {stats.hit_length_limit} hit "
                       f"max_new_tokens) in {stats.seconds:.1f}s -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
