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

import json

import jax
import jax.numpy as jnp

from mtp_jax.mtp.cudnn_private import cudnn_part, cudnn_part_dq
from mtp_kernels.attention_dq import DQConfig, jax_attention_dq
from _report import environment, header, ratio, text_table, write_json
from mtp_step import measure
from prefix_attention import chunk_inputs, chunk_parser, chunk_starts

CONFIGS = [DQConfig(128, 64, 8, 2), DQConfig(128, 64, 8, 3), DQConfig(128, 128, 8, 2), DQConfig(64, 64, 4, 3),
           DQConfig(64, 128, 4, 2), DQConfig(128, 32, 4, 3), DQConfig(64, 64, 4, 4)]


def main():
    args = chunk_parser(__doc__, reps=10).parse_args()
    n, c, length, d = args.heads * args.k, args.chunk, args.length, args.head_dim
    q, k, v, g = chunk_inputs(args, jnp.bfloat16, jnp.float32)
    rows = []
    for start in chunk_starts(args):
        kv_len = jnp.full((1,), start, jnp.int32)
        out, lse = jax.jit(lambda q, k, v: cudnn_part(q, k, v, kv_len, False))(q, k, v)
        out = out.astype(jnp.float32)
        work = 6 * d * n * c * start
        variants = {"cudnn": lambda q, k, v, g, out, lse, kv_len: cudnn_part_dq(q, k, v, kv_len, False, out, lse, g)}
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
    print(text_table([("chunk start", "start", ">11"), ("variant", "variant", ">24"), ("ms", "ms", "8.3f"),
                      ("TFLOP/s", "tflops", "8.0f"), ("vs cuDNN", "speedup", ">8"), ("rel diff", "rel_diff", "9.2e"),
                      ("", "error", "")], rows))
    write_json(args.out, {**env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
