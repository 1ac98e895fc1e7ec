"""Data pipeline throughput and padding on CPU: cache build and batch iteration (examples/s), and the
padding fraction of random vs length-grouped vs length-grouped + packed batches, measured in one run.

python benchmarks/data_pipeline.py [--examples 10000] [--out benchmarks/results/data_pipeline_DATE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mtp_jax.data import DataConfig, make_batches, prepare
from mtp_jax.models import load_tokenizer
from _report import cpu_name, environment, header, markdown_table, write_text


def synthetic_file(path: Path, n: int, seed: int = 0) -> Path:
    """Prompt and response lengths drawn log-normally (a long tail, like chat data)."""
    r = np.random.default_rng(seed)
    words = ["def", "return", "the", "number", "list", "value", "x", "=", "+", "for", "in", "range", "print", "42"]
    with open(path, "w") as f:
        for i in range(n):
            p = int(np.clip(r.lognormal(3.0, 0.7), 3, 400))
            o = int(np.clip(r.lognormal(4.3, 0.8), 2, 1500))
            f.write(json.dumps({"input": f"Task {i}: " + " ".join(r.choice(words, p)),
                                "output": " ".join(r.choice(words, o))}) + "\n")
    return path


def padding_fraction(batches) -> float:
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    return 1 - real / sum(b["tokens"].size for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_total_tokens", type=int, default=2048)
    ap.add_argument("--out", default=None, help="also write the table as Markdown here")
    args = ap.parse_args()

    tok = load_tokenizer("smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp(prefix="mtp_data_bench_"))
    data = synthetic_file(tmp / "data.jsonl", args.examples)
    cfg = DataConfig(train_file=str(data), eval_file=str(data), cache_dir=str(tmp / "cache"),
                     max_prompt_tokens=512, max_total_tokens=args.max_total_tokens, batch_size=args.batch_size)
    t0 = time.perf_counter()
    cache = prepare(cfg, tok, draft_length=4)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare(cfg, tok, draft_length=4)
    hit_s = time.perf_counter() - t0

    rows = []
    variants = {
        "random batches (no grouping, no packing)": dataclasses.replace(cfg, packing=False, length_grouping=False),
        "length-grouped": dataclasses.replace(cfg, packing=False),
        "length-grouped + packed": cfg,
    }
    for name, c in variants.items():
        t0 = time.perf_counter()
        batches = list(make_batches(cache, c, train=False))  # one full pass over the examples
        secs = time.perf_counter() - t0
        shapes = sorted({b["tokens"].shape[1] for b in batches})
        rows.append((name, len(batches), len(cache) / secs, padding_fraction(batches), len(shapes)))

    env = environment(("jax", "grain"), device=cpu_name())
    lines = [
        f"# Data pipeline benchmark ({env['date']})",
        "",
        header(env),
        f"data: {len(cache)} synthetic chat examples ({cache.manifest['tokens']} tokens, SmolLM2 tokenizer), "
        f"batch_size {cfg.batch_size} rows, max_total_tokens {cfg.max_total_tokens}; iteration = one eval-order "
        "pass, single thread (num_workers 0)",
        "",
        *markdown_table(["stage", "examples/s", "seconds"], [
            ["cache build (read + chat template + tokenize + ArrayRecord write)", f"{len(cache) / build_s:,.0f}",
             f"{build_s:.2f}"],
            ["cache hit (fingerprint + open)", "-", f"{hit_s:.3f}"]], right=[False, True, True]),
        "",
        *markdown_table(["batching", "batches", "iteration examples/s", "padding fraction", "distinct L"],
                        [[n, b, f"{eps:,.0f}", f"{pad:.3f}", s] for n, b, eps, pad, s in rows],
                        right=[False, True, True, True, True]),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
