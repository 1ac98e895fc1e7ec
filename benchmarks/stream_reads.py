"""The streaming engine's cost per model call with `calls_per_read` N against N = 1 (a server's reads).

    python benchmarks/stream_reads.py                  # SmolLM2-135M shapes, random weights, N = 1, 2, 4, 8
    python benchmarks/stream_reads.py --tiny           # its 30 layers at tiny widths: the host's share shows on a CPU

A server decodes through `speculative_calls` / `plain_calls`: each read is a dispatch of a program from
Python and a read of its tokens back, and with N = 1 every model call pays that host work. For each
decoding (speculative: random adapters, k = 4, layout `all`, so about one token per call; plain) and N,
batch-1 generations of --new_tokens tokens (no EOS) read every StreamCall as a server does, and
ms_per_call = wall time after the prompt's call / model calls after it, median of --repeats. Prints
each N's figure and its ratio to N = 1's of the same run (`x N=1`, below 1 is faster); JSON with --out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from _report import environment, fmt, header, write_json
from decode import random_models
from mtp_jax.decoding.layout import prepare
from mtp_jax.decoding.plain import plain_calls
from mtp_jax.decoding.speculative import speculative_calls

NEVER = [-1]  # an EOS id no token has


def time_reads(calls_fn, model, params, prompt: list[int], new_tokens: int, per_read: int, repeats: int) -> float:
    """Median ms per model call after the prompt's, reading every StreamCall (the first run compiles)."""
    times = []
    for _ in range(repeats + 1):
        stream = calls_fn(model, params, [prompt], new_tokens, NEVER, calls_per_read=per_read)
        next(stream)  # the prompt's call
        t0 = time.perf_counter()
        for call in stream:
            pass
        times.append(1e3 * (time.perf_counter() - t0) / (int(call.steps[0]) - 1))
    return statistics.median(times[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/smollm2-135m.json")
    ap.add_argument("--tiny", action="store_true", help="the model's layer count at tiny widths")
    ap.add_argument("--per_read", default="1,2,4,8", help="calls_per_read values (1 is the baseline)")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lm, model, params = random_models(args.model, args.tiny, jnp.dtype(args.dtype))
    base_model, base_params = prepare(lm, params["base"])  # the decoding layouts, built once
    model, params = prepare(model, params)
    prompt = list(range(1, 49))
    per_read = [int(n) for n in args.per_read.split(",")]
    rows = []
    for decoding, fn, m, p in (("speculative", speculative_calls, model, params),
                               ("plain", plain_calls, base_model, base_params)):
        for n in per_read:
            ms = time_reads(fn, m, p, prompt, args.new_tokens, n, args.repeats)
            rows.append({"decoding": decoding, "calls_per_read": n, "ms_per_call": round(ms, 4)})
            print(f"{decoding:11s} calls_per_read {n}: {ms:.3f} ms per model call", flush=True)
    env = environment()
    print(f"\n{header(env)}  {args.model}{' (tiny widths)' if args.tiny else ''}, {args.dtype}, batch 1, "
          f"{args.new_tokens} new tokens")
    for r in rows:
        base = next(b for b in rows if b["decoding"] == r["decoding"] and b["calls_per_read"] == per_read[0])
        r["x_first"] = round(r["ms_per_call"] / base["ms_per_call"], 3)
        print(f"{r['decoding']:11s} {r['calls_per_read']:3d} {fmt(r['ms_per_call'], '9.3f')} ms  "
              f"x N={per_read[0]}: {r['x_first']:.2f}")
    write_json(args.out, {**env, "model": args.model, "tiny": args.tiny, "dtype": args.dtype,
                          "new_tokens": args.new_tokens, "devices": [str(d) for d in jax.devices()[:1]], "rows": rows})


if __name__ == "__main__":
    main()
