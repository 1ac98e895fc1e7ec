"""The split prefix attention's backward for the keys before a chunk: mtp_kernels' Triton dq kernel
(dq only) against cuDNN's full backward (dq, dK, dV; the one the objective otherwise runs), same inputs.

One anchor chunk (C anchors x k draft steps folded into k*h query heads) against the regular keys before
it (kv heads), for chunks starting at a quarter, half and the end of L regular keys: the merged output
and LSE come from one cuDNN forward, as in `split_prefix_attention`'s backward. Per chunk start and Triton
config: ms (median of --reps, `mtp_step.measure`), TFLOP/s of the dq work (3 matmuls: 6*d*heads per
(query, key) pair), the speedup over cuDNN, and the max |dq difference| relative to cuDNN's max |dq|.

    python benchmarks/attention_dq.py --length 16384 --chunk 1024 --out results.json
GPU only (cuDNN, jax_triton).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from mtp_jax.mtp.attention import _cudnn_part, _cudnn_part_dq
from mtp_kernels.attention_dq import DQConfig, jax_attention_dq
from _report import environment, fmt, header, ratio, write_json
from mtp_step import measure

CONFIGS = [DQConfig(128, 64, 8, 2), DQConfig(128, 64, 8, 3), DQConfig(128, 128, 8, 2), DQConfig(64, 64, 4, 3),
           DQConfig(64, 128, 4, 2), DQConfig(128, 32, 4, 3), DQConfig(64, 64, 4, 4)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=16384, help="regular keys L")
    ap.add_argument("--chunk", type=int, default=1024, help="anchors per chunk C")
    ap.add_argument("--heads", type=int, default=32, help="query heads h (Qwen3-8B: 32)")
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="draft steps folded into the heads")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, c, length, d = args.heads * args.k, args.chunk, args.length, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, c, n, d), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, length, args.kv_heads, d), jnp.bfloat16) for kk in keys[1:3])
    g = jax.random.normal(keys[3], q.shape, jnp.float32)
    rows = []
    for start in sorted({length // 4, length // 2, length - c}):
        kv_len = jnp.full((1,), start, jnp.int32)
        out, lse = jax.jit(lambda q, k, v: _cudnn_part(q, k, v, kv_len, False))(q, k, v)
        out = out.astype(jnp.float32)
        work = 6 * d * n * c * start
        variants = {"cudnn": lambda q, k, v, g, out, lse, kv_len: _cudnn_part_dq(q, k, v, kv_len, False, out, lse, g)}
        for cfg in CONFIGS:
            variants[f"triton {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"] = (
                lambda q, k, v, g, out, lse, kv_len, cfg=cfg: jax_attention_dq(q, k, v, g, lse, jnp.sum(g * out, -1),
                                                                               kv_len, cfg))
        inputs = (q, k, v, g, out, lse, kv_len)
        ref = jax.jit(variants["cudnn"])(*inputs)
        base = None
        for name, f in variants.items():
            m = measure(lambda *a: (jnp.float32(0), f(*a)), *inputs, reps=args.reps)
            row = {"start": start, "variant": name, "error": m.get("error")}
            if m["time_s"]:
                dq = jax.jit(f)(*inputs)
                base = m["time_s"] if name == "cudnn" else base
                row.update(ms=1e3 * m["time_s"], tflops=work / m["time_s"] / 1e12, speedup=ratio(base, m["time_s"]),
                           rel_diff=float(jnp.max(jnp.abs(dq - ref)) / jnp.max(jnp.abs(ref))))
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = environment()
    print(f"\n{header(env)}  L={length} C={c} heads={n} "
          f"(h={args.heads} x k={args.k}) kv={args.kv_heads} d={d}")
    print(f"{'chunk start':>11} {'variant':>24} {'ms':>8} {'TFLOP/s':>8} {'vs cuDNN':>8} {'rel diff':>9}")
    for r in rows:
        print(f"{r['start']:>11} {r['variant']:>24} {fmt(r.get('ms'), '8.3f')} {fmt(r.get('tflops'), '8.0f')} "
              f"{r.get('speedup', '-'):>8} {fmt(r.get('rel_diff'), '9.2e')} {r.get('error') or ''}")
    write_json(args.out, {**env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
