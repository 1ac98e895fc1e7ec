"""The server's warm-up (`Batcher.warm_up`: every batch size's programs compiled before it answers) with
its pairs compiled 1, 2, 4, ... at a time, in one run.

    python benchmarks/warm_up.py                      # SmolLM2-135M shapes, random weights
    python benchmarks/warm_up.py --tiny               # its 30 layers at tiny widths (a CPU in a minute)

Each thread count gets a fresh process (a compiled program stays in its process's caches), the same
speculative Batcher (random adapters, k = 4, batch sizes --batch_sizes, decode length --decode_length)
and warms up for prompts up to --prompt_tokens. Prints seconds per thread count and the ratio to the
first; JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _report import environment, header, write_json


def warm(args) -> float:
    """Seconds of one warm-up in this process."""
    import jax.numpy as jnp

    from decode import random_models
    from mtp_jax.decoding.layout import prepare
    from mtp_jax.serve.batcher import Batcher

    _, model, params = random_models(args.model, args.tiny, jnp.dtype(args.dtype))
    model, params = prepare(model, params)
    sizes = [int(n) for n in args.batch_sizes.split(",")]
    batcher = Batcher(model, params, None, [-1], 0, max_batch=max(sizes), decode_length=args.decode_length,
                      batch_sizes=sizes)
    t0 = time.perf_counter()
    batcher.warm_up(args.prompt_tokens, progress=False, threads=args.worker)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/smollm2-135m.json")
    ap.add_argument("--tiny", action="store_true", help="the model's layer count at tiny widths")
    ap.add_argument("--threads", default="1,2,4", help="pairs compiled at a time, one run each")
    ap.add_argument("--batch_sizes", default="1,2,4")
    ap.add_argument("--prompt_tokens", type=int, default=32)
    ap.add_argument("--decode_length", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one timed warm-up, then exit
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps({"seconds": warm(args)}))
        return
    passed = list(sys.argv[1:] if argv is None else argv)
    rows, first = [], None
    for n in [int(t) for t in args.threads.split(",")]:
        done = subprocess.run([sys.executable, __file__, *passed, "--worker", str(n)], capture_output=True,
                              text=True, check=True)
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        first = first or seconds
        rows.append({"threads": n, "seconds": round(seconds, 2), "x_first": round(seconds / first, 3)})
        print(f"threads {n}: {seconds:.1f} s  x first: {rows[-1]['x_first']:.2f}", flush=True)
    env = environment()
    print(f"{header(env)}  {args.model}{' (tiny widths)' if args.tiny else ''}, batch sizes {args.batch_sizes}, "
          f"prompts up to {args.prompt_tokens} tokens, decode length {args.decode_length}")
    write_json(args.out, {**env, **{k: v for k, v in vars(args).items() if k not in ("worker", "out")}, "rows": rows})


if __name__ == "__main__":
    main()
