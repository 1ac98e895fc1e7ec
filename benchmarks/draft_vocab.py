"""How much of a model's output a drafting vocabulary covers (issue 24: `--draft_vocab N`).

    python benchmarks/draft_vocab.py --data answers.jsonl[.gz] --tokenizer smollm2-135m-instruct
    python benchmarks/draft_vocab.py --smoke          # a few records, CPU, end to end

A speculative decoder with a drafting vocabulary of N ids can only have a draft accepted where the base
model's next token is one of them. The list is the one decoding takes (`decoding.adapter.most_frequent`):
the N ids most frequent in the training responses, counted by the data cache (`token_counts.npy`). Here
every 7th record of `--data` is held out, the cache is built from the others, and for each N the report
gives, over the held-out responses (each output's tokens and its EOS): `token_coverage`, the share of
tokens in the list (an upper bound on a draft position's acceptance relative to the whole vocabulary), and
`window_coverage`, the share of positions whose next k tokens all lie in the list (where a full draft of k
could be accepted), overall and per domain (the record id's prefix before '-', where ids have one). With
the data being the base model's own greedy answers (`mtp_jax.data.distill`), the held-out tokens are what
the model decodes. Writes JSON and Markdown (--out, --md).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import environment, markdown_table, write_json, write_text  # noqa: E402

from mtp_jax.data.cache import BuildParams, build_cache  # noqa: E402
from mtp_jax.data.tokenize import TokenizeParams  # noqa: E402
from mtp_jax.decoding.adapter import most_frequent  # noqa: E402
from mtp_jax.models import load_tokenizer  # noqa: E402

HOLD_OUT_EVERY = 7


def read_json_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def domain_of(record: dict) -> str:
    rid = str(record.get("id", ""))
    return rid.split("-", 1)[0] if "-" in rid else "all"


def smoke_records() -> list[dict]:
    """--smoke's records: two domains, a few words repeated, so that a list of 8 ids misses some tokens."""
    return [{"id": f"{'code' if i % 2 else 'chat'}-{i}", "input": f"question {i}",
             "output": " ".join(["alpha", "beta", "gamma", f"word{i % 5}"] * 3)} for i in range(28)]


def coverage(sequences: list[np.ndarray], in_list: np.ndarray, k: int) -> tuple[float, float]:
    """(share of tokens in the list, share of positions whose next k tokens all are)."""
    tokens = windows = full = hit = 0
    for seq in sequences:
        inside = in_list[seq]
        hit += int(inside.sum())
        tokens += len(seq)
        if len(seq) >= k:  # windows of k consecutive tokens all inside: a run-length count
            run = np.convolve(inside.astype(np.int32), np.ones(k, np.int32), "valid")
            full += int((run == k).sum())
            windows += len(run)
    return hit / max(tokens, 1), full / max(windows, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="JSONL (.gz too) of {input, output[, id]} records: the model's answers")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct", help="HF dir, .gguf or alias")
    ap.add_argument("--sizes", default="1024,4096,8192,16384,32768", help="list sizes N")
    ap.add_argument("--k", type=int, default=4, help="draft length for window_coverage")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--md", default=None, help="Markdown path")
    ap.add_argument("--smoke", action="store_true", help="a few generated records, sizes 8 and 64")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    if args.smoke:
        records, sizes = smoke_records(), [8, 64]
    else:
        if args.data is None:
            ap.error("--data is required (or --smoke)")
        records = read_json_lines(args.data)
        sizes = [int(n) for n in args.sizes.split(",")]
    train = [r for i, r in enumerate(records) if i % HOLD_OUT_EVERY]
    held = [r for i, r in enumerate(records) if not i % HOLD_OUT_EVERY]
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        train_file.write_text("".join(json.dumps({"input": r["input"], "output": r["output"]}) + "\n" for r in train))
        cache = build_cache(train_file, tok, BuildParams(TokenizeParams("chat", 1024, 4096)), Path(tmp) / "cache")
        counts = cache.token_counts()
    vocab_size = len(tok)
    lists = {n: most_frequent(counts, n, vocab_size) for n in sizes}
    by_domain: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for r in held:
        ids = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        by_domain[domain_of(r)].append(np.asarray(ids, np.int64))
    domains = sorted(by_domain)
    every = [s for d in domains for s in by_domain[d]]
    rows = []
    for n, ids in lists.items():
        in_list = np.zeros(vocab_size, bool)
        in_list[ids] = True
        row = {"size": n, "share_of_vocabulary": round(n / vocab_size, 4)}
        row["token_coverage"], row["window_coverage"] = (round(x, 4) for x in coverage(every, in_list, args.k))
        for d in domains if len(domains) > 1 else ():
            row[f"token_coverage_{d}"], row[f"window_coverage_{d}"] = (
                round(x, 4) for x in coverage(by_domain[d], in_list, args.k))
        rows.append(row)
    report = {**environment(("jax", "transformers")), "command": " ".join(sys.argv), "tokenizer": args.tokenizer,
              "vocabulary": vocab_size, "k": args.k, "train_records": len(train), "held_out_records": len(held),
              "held_out_tokens": int(sum(map(len, every))), "train_response_tokens": int(cache.manifest["anchors"]),
              "domains": {d: len(by_domain[d]) for d in domains}, "rows": rows}
    headers = ["N", "share of vocabulary", "tokens in the list", f"windows of {args.k} in the list"] + \
        [f"{d}: tokens / windows" for d in domains if len(domains) > 1]
    table = markdown_table(headers, [
        [r["size"], f"{r['share_of_vocabulary']:.1%}", f"{r['token_coverage']:.2%}", f"{r['window_coverage']:.2%}"]
        + [f"{r[f'token_coverage_{d}']:.2%} / {r[f'window_coverage_{d}']:.2%}" for d in domains if len(domains) > 1]
        for r in rows], right=[True] * len(headers))
    print("\n".join(table))
    write_json(args.out, report)
    write_text(args.md, "\n".join(table) + "\n")
    return report


if __name__ == "__main__":
    main()
