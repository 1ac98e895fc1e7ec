"""cuDNN attention at the mask stream's prefix shapes: what the dense mask costs, variant by variant.

One anchor chunk (C anchors, the k draft steps folded into the heads: k*h query heads) against L
regular keys (kv heads), forward + backward with the gradient wrt q only (the regular K/V are
stop-gradient), for chunks at a quarter, half and the end of the sequence:

- `mask`: the dense [C, L] prefix mask, as the objective passes it today. jax hands cuDNN a mask as a
  bias, and its backward also computes the bias gradient (`should_export_dbias` is always true);
- `split`: no mask (`mtp.prefix_split`): the keys before the chunk (key length = chunk start) and the
  C x C causal block on the diagonal, two cuDNN calls merged by log-sum-exp (one example per row);
  `split+dq`: the same with the keys before the chunk's backward in mtp_kernels' Triton dq kernel;
- `none`: all L keys, no mask: the kernel's own speed on the same shapes.

The variants run the objective's own functions (`mtp_jax.mtp.attention`). Each variant's output is
checked against `mask`; the time is the median of --reps runs (`mtp_step.measure`); TFLOP/s
count only the needed work (each anchor's prefix, forward 4*d*heads per (query, key) pair and a
backward of twice that).

    python benchmarks/prefix_attention.py --length 16384 --chunk 1024
GPU only at these shapes (cuDNN); on a CPU a tiny run (--impl xla) checks the arithmetic.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from mtp_jax.mtp.attention import prefix_attention, split_prefix_attention
from _report import environment, header, text_table, write_json
from mtp_step import measure


def variants(impl: str, start: int, c: int):
    """name -> f(q, k, v) -> out, for the chunk of anchors start .. start + c - 1: the objective's own
    prefix attention functions, and plain attention with no mask."""
    first = jnp.full((1,), start, jnp.int32)

    def prefix_mask(keys):
        return (jnp.arange(keys)[None, :] <= start + jnp.arange(c)[:, None])[None, None]

    def split(q, k, v, dq_kernel):  # no third part: zero weight (lse -inf-like)
        none = jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -1e30, jnp.float32)
        return split_prefix_attention(q, k, v, first, *none, impl, dq_kernel).astype(q.dtype)

    return {
        "mask": lambda q, k, v: prefix_attention(q, k, v, prefix_mask(k.shape[1]), impl)[0],
        "split": lambda q, k, v: split(q, k, v, "cudnn"),
        "split+dq": lambda q, k, v: split(q, k, v, "triton"),
        "none": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl),
    }


def chunk_parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """Options of one anchor chunk against the regular keys (this benchmark's and attention_dq's)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=16384, help="regular keys L")
    ap.add_argument("--chunk", type=int, default=1024, help="anchors per chunk C")
    ap.add_argument("--heads", type=int, default=32, help="query heads h (Qwen3-8B: 32)")
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="draft steps folded into the heads")
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--out", default=None)
    return ap


def chunk_inputs(args, dtype, grad_dtype):
    """Random q [1, C, k*h, d], k and v [1, L, kv, d], and an output cotangent g like q."""
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, args.chunk, args.heads * args.k, args.head_dim), dtype)
    k, v = (jax.random.normal(kk, (1, args.length, args.kv_heads, args.head_dim), dtype) for kk in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], q.shape, grad_dtype)


def chunk_starts(args) -> list[int]:
    """Chunks at a quarter, half and the end of the sequence."""
    return sorted({args.length // 4, args.length // 2, args.length - args.chunk})


def main():
    ap = chunk_parser(__doc__, reps=5)
    ap.add_argument("--impl", default="cudnn", choices=["cudnn", "xla"])
    args = ap.parse_args()
    dtype = jnp.bfloat16 if args.impl == "cudnn" else jnp.float32
    n, c, length = args.heads * args.k, args.chunk, args.length
    q, k, v, g = chunk_inputs(args, dtype, dtype)
    rows = []
    for start in chunk_starts(args):
        needed = sum(start + i + 1 for i in range(c)) * 4 * args.head_dim * n * 3  # fwd + 2x fwd backward
        ref = None
        for name, f in variants(args.impl, start, c).items():
            out = jax.jit(f)(q, k, v)
            ref = out if ref is None else ref
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
            step = jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * g))
            m = measure(step, q, k, v, reps=args.reps)
            row = {"start": start, "variant": name, "max_abs_diff_vs_mask": err, "compile_s": m.get("compile_s"),
                   "peak_gib": m["peak_gib"], "error": m.get("error")}
            if m["time_s"]:
                row.update(ms=1e3 * m["time_s"], tflops_needed=needed / m["time_s"] / 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = environment()
    print(f"\n{header(env)}  L={length} C={c} "
          f"heads={n} (h={args.heads} x k={args.k}) kv={args.kv_heads} d={args.head_dim}")
    print(text_table([("chunk start", "start", ">11"), ("variant", "variant", ">9"), ("ms", "ms", "8.3f"),
                      ("TFLOP/s", "tflops_needed", "8.0f"), ("max |diff|", "max_abs_diff_vs_mask", ">10.2e")], rows))
    write_json(args.out, {**env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
