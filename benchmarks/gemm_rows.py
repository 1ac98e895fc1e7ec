"""How a decoding call's matmuls cost with the rows they hold (issue 24: a speculative call's 9 rows
against a plain call's 1).

    python benchmarks/gemm_rows.py                      # Qwen3-8B's projections, this process's XLA flags
    python benchmarks/gemm_rows.py --variants           # also each XLA_FLAGS variant, one subprocess each
    python benchmarks/gemm_rows.py --smoke              # tiny shapes, CPU

For each projection shape [K, N] of the model (the decoding layout's: the fused adapters' A columns ride
in q_proj's and gate_proj's kernels) and each row count M, one jitted chain of `layers` matmuls with
distinct weights (each layer's input depends on the last, so XLA neither merges nor reorders them) is
timed; us_per_gemm = median time / layers, and GB/s = the weight bytes read per matmul / us_per_gemm.
A memory-bound matmul reads its weights once whatever M is: at the rows of a decoding call, the
figure should not move with M. Prints a table per variant and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> XLA_FLAGS added to the environment's
    "default": "",
    "cublas": "--xla_gpu_enable_triton_gemm=false",
}


def shapes(model: dict, rank: int) -> dict[str, tuple[int, int]]:
    """Projection name -> (K, N) of the decoding layout with fused adapters of `rank` (3 A blocks in q_proj,
    2 in gate_proj: decoding.model.a_columns), and q+A padded to multiples of 64 and 128 columns."""
    d, mlp = model["hidden_size"], model["intermediate_size"]
    head = model.get("head_dim") or d // model["num_attention_heads"]
    q, kv = model["num_attention_heads"] * head, model["num_key_value_heads"] * head
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    return {"q+A": (d, q + 3 * rank), "k": (d, kv), "o": (q, d), "gate+A": (d, mlp + 2 * rank), "up": (d, mlp),
            "down": (mlp, d), "q": (d, q), "gate": (d, mlp),
            # q+A with zero columns up to a multiple of 64 / 128: does the kernel choice, not the bytes, cost?
            "q+A/64": (d, up(q + 3 * rank, 64)), "q+A/128": (d, up(q + 3 * rank, 128))}


def time_shape(k: int, n: int, rows: int, layers: int, repeats: int) -> float:
    """Median seconds of one chain of `layers` [rows, k] @ [k, n] bf16 matmuls."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), layers)
    weights = [jax.random.normal(key, (k, n), jnp.bfloat16) * 0.02 for key in keys]
    x = jnp.ones((rows, k), jnp.bfloat16)

    @jax.jit
    def chain(x, weights):
        for w in weights:
            y = jnp.dot(x, w, preferred_element_type=jnp.float32)
            y = jnp.tile(y, (1, -(-k // n)))[:, :k] if n < k else y[:, :k]
            x = (y * 0.5).astype(jnp.bfloat16)
        return x

    chain(x, weights).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(x, weights).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(args) -> list[dict]:
    model = json.loads((ROOT / args.model).read_text())
    if args.smoke:
        model = {**model, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16}
    rows_out = []
    for name, (k, n) in shapes(model, args.rank).items():
        for m in [int(r) for r in args.rows.split(",")]:
            s = time_shape(k, n, m, args.layers, args.repeats)
            us = 1e6 * s / args.layers
            rows_out.append({"shape": name, "K": k, "N": n, "M": m, "us_per_gemm": round(us, 2),
                             "GB_per_s": round(2 * k * n / us / 1e3, 1)})
            print(f"{name:7s} K={k:6d} N={n:6d} M={m:3d}  {us:9.2f} us  {rows_out[-1]['GB_per_s']:8.1f} GB/s",
                  flush=True)
    return rows_out


def layer_us(rows: list[dict]) -> dict[int, float]:
    """Rows per call -> microseconds of a layer's distinct projection shapes in the decoding layout, one
    matmul each (q+A, k, o, gate+A, up, down; v, of k's shape, not counted again)."""
    layer = ("q+A", "k", "o", "gate+A", "up", "down")
    us = {(r["shape"], r["M"]): r["us_per_gemm"] for r in rows}
    return {m: sum(us[name, m] for name in layer) for m in sorted({r["M"] for r in rows})}


def run_variant(name: str, argv: list[str]) -> list[dict]:
    """This script in a subprocess under variant `name`'s XLA_FLAGS; its rows."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {VARIANTS[name]}".strip()
    out = Path(f"/tmp/gemm_rows_{name}.json")
    cmd = [sys.executable, __file__, *argv, "--out", str(out), "--tag", name]
    print(f"=== {name}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())["rows"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/models/qwen3-8b.json")
    ap.add_argument("--rows", default="1,9,16")
    ap.add_argument("--rank", type=int, default=16, help="adapter rank (decode.py's random adapters: 16)")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--variants", action="store_true", help="every XLA_FLAGS variant, one subprocess each")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.variants:
        passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--variants"]
        result = {name: run_variant(name, passed) for name in VARIANTS}
        per_layer = {name: layer_us(rows) for name, rows in result.items()}
        for name, total in per_layer.items():
            print(f"{name:14s} " + "  ".join(f"M={m}: {t / 1e3:.3f} ms per layer-set" for m, t in total.items()))
        if args.out:
            Path(args.out).write_text(json.dumps({"variants": result, "per_layer_us": per_layer}, indent=1))
        return
    rows = measure(args)
    if args.out:
        Path(args.out).write_text(json.dumps({"tag": args.tag, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
