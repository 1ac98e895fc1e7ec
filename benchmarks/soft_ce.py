"""Soft cross-entropy benchmark (GPU): our Triton op (JAX and PyTorch) vs naive baselines.

    python benchmarks/soft_ce.py [--shapes 4096x32000,...] [--out DIR]

Each framework runs in its own child process (so neither starves the other of
GPU memory). For every [N, V] bf16 shape and implementation it prints forward
and forward+backward time (median of 5 groups of back-to-back calls, after
warm-up), peak memory, and effective bandwidth: the fewest bytes the op must
move (forward: read x and t; forward+backward: read x and t twice, write grad
once) over the time, as % of a device-to-device copy timed in the same process.
Writes soft_ce.md and soft_ce.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _report import environment, markdown_table, write_json, write_text

SHAPES = [(n, v) for n in (4096, 16384, 32768) for v in (32000, 128256, 151936)]
IMPLS = {
    "torch": ["ours_torch", "ours_torch_masked", "naive_torch", "compiled_naive_torch"],
    "jax": ["ours_jax", "ours_jax_masked", "naive_jax"],
}


def _time(call, sync, budget_s=0.06, groups=5):
    """Median seconds per call: warm up, then 5 groups of k back-to-back calls."""
    call(); sync()  # noqa: E702
    t0 = time.perf_counter(); call(); sync(); one = time.perf_counter() - t0  # noqa: E702
    k = max(1, min(50, int(budget_s / max(one, 1e-6))))
    times = []
    for _ in range(groups):
        t0 = time.perf_counter()
        for _ in range(k):
            call()
        sync()
        times.append((time.perf_counter() - t0) / k)
    return statistics.median(times)


def _is_oom(e: Exception) -> bool:
    s = f"{type(e).__name__} {e}"
    return "out of memory" in s.lower() or "RESOURCE_EXHAUSTED" in s or "OutOfMemory" in s


# ---------------------------------------------------------------- torch worker
# Each worker process imports its own framework, whose GPU allocator then owns the device: imports stay in the workers.
def torch_worker(shapes, impls):
    import torch

    from mtp_kernels.soft_ce import torch_soft_ce

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    a = torch.empty(1 << 32, dtype=torch.uint8, device=dev)  # 4 GiB
    b = torch.empty_like(a)
    copy_s = _time(lambda: b.copy_(a), sync)
    copy_bw = 2 * a.numel() / copy_s
    del a, b

    def naive(x, t):
        logp = torch.log_softmax(x.float(), dim=-1)
        p = torch.softmax(t.float(), dim=-1)
        return -(p * logp).sum(-1)

    compiled = torch.compile(naive, dynamic=True)
    fns = {
        "ours_torch": lambda x, t: torch_soft_ce(x, t, reduction="none"),
        "naive_torch": naive,
        "compiled_naive_torch": compiled,
    }
    rows = []
    for n, v in shapes:
        torch.cuda.empty_cache()
        x = torch.randn(n, v, device=dev, dtype=torch.bfloat16)
        t = torch.randn(n, v, device=dev, dtype=torch.bfloat16)
        xg = x.detach().requires_grad_(True)
        keep = torch.rand(n, device=dev) > 0.1  # *_masked: ~10% of rows masked out
        fns["ours_torch_masked"] = lambda x, t, keep=keep: torch_soft_ce(x, t, keep, reduction="none")
        for name in impls:
            f = fns[name]
            row = dict(impl=name, N=n, V=v)
            for mode in ("fwd", "fwd_bwd"):
                torch.cuda.empty_cache()
                if mode == "fwd":
                    def call():
                        with torch.no_grad():
                            return f(x, t)
                else:
                    def call():
                        return torch.autograd.grad(f(xg, t).sum(), xg)[0]
                try:
                    call(); sync()  # noqa: E702  (autotuning and compiling stay out of the peak)
                    torch.cuda.reset_peak_memory_stats()
                    call(); sync()  # noqa: E702
                    peak = torch.cuda.max_memory_allocated()
                    row[mode + "_s"] = _time(call, sync)
                    row[mode + "_peak_gb"] = peak / 1e9
                except Exception as e:  # noqa: BLE001
                    if not _is_oom(e):
                        raise
                    row[mode + "_s"] = None
                    row[mode + "_err"] = "OOM"
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del x, t, xg
    info = dict(copy_bw=copy_bw, device=torch.cuda.get_device_name(), torch=torch.__version__)
    import triton

    info["triton"] = triton.__version__
    return info, rows


# ------------------------------------------------------------------ jax worker
def jax_worker(shapes, impls):
    import jax
    import jax.numpy as jnp

    from mtp_kernels.soft_ce import jax_soft_ce

    sync_of = lambda out: (lambda: jax.block_until_ready(out[0]))  # noqa: E731
    a = jnp.zeros((1 << 31,), jnp.uint16)  # 4 GiB
    neg = jax.jit(lambda a: ~a)  # one read and one write per element, like a copy
    holder = [None]

    def copy():
        holder[0] = neg(a)

    copy_s = _time(copy, sync_of(holder))
    copy_bw = 2 * a.size * 2 / copy_s
    del a, holder

    def naive(x, t):
        logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        p = jax.nn.softmax(t.astype(jnp.float32), axis=-1)
        return -jnp.sum(p * logp, axis=-1)

    fns = {"ours_jax": lambda x, t: jax_soft_ce(x, t, impl="triton"), "naive_jax": naive}
    rows = []
    for n, v in shapes:
        # jax.random tops out at 2**32 elements: tile 1024 random rows (311 MB
        # at V=152k, far above L2, so timings are not cache hits).
        kx, kt = jax.random.split(jax.random.key(0))
        reps = -(-n // 1024)
        x = jnp.tile(jax.random.normal(kx, (min(n, 1024), v), jnp.bfloat16), (reps, 1))[:n]
        t = jnp.tile(jax.random.normal(kt, (min(n, 1024), v), jnp.bfloat16), (reps, 1))[:n]
        keep = jax.random.uniform(jax.random.key(1), (n,)) > 0.1  # *_masked: ~10% of rows masked out
        fns["ours_jax_masked"] = lambda x, t, keep=keep: jax_soft_ce(x, t, keep, impl="triton")
        for name in impls:
            f = fns[name]
            row = dict(impl=name, N=n, V=v)
            progs = {
                "fwd": jax.jit(f),
                "fwd_bwd": jax.jit(jax.grad(lambda x, t, f=f: jnp.sum(f(x, t)))),
            }
            for mode, prog in progs.items():
                out = [None]

                def call(prog=prog, out=out):
                    out[0] = prog(x, t)

                try:
                    ma = prog.lower(x, t).compile().memory_analysis()
                    peak = None if ma is None else (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                                    + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
                    row[mode + "_s"] = _time(call, sync_of(out))
                    row[mode + "_peak_gb"] = None if peak is None else peak / 1e9
                except Exception as e:  # noqa: BLE001
                    if not _is_oom(e):
                        raise
                    row[mode + "_s"] = None
                    row[mode + "_err"] = "OOM"
                out[0] = None
            rows.append(row)
            print(json.dumps(row), flush=True)
        del x, t
    info = dict(copy_bw_jax=copy_bw, jax=jax.__version__, jax_device=jax.devices()[0].device_kind)
    return info, rows


# ---------------------------------------------------------------------- parent
def _fmt_ms(s):
    return "—" if s is None else f"{s * 1e3:.2f}"


def table(rows, copy_bw):
    """Markdown table; bandwidth % against the torch-measured copy."""
    cells = []
    naive = {(r["N"], r["V"]): r.get("fwd_bwd_s") for r in rows if r["impl"] == "naive_torch"}
    for r in rows:
        elems = r["N"] * r["V"]
        pct = {}
        for mode, nbytes in (("fwd", 2 * 2 * elems), ("fwd_bwd", 5 * 2 * elems)):
            s = r.get(mode + "_s")
            pct[mode] = "—" if s is None else f"{100 * nbytes / s / copy_bw:.0f}%"
        fb = r.get("fwd_bwd_s")
        base = naive.get((r["N"], r["V"]))
        speedup = "—" if fb is None or base is None else f"{base / fb:.1f}x"
        peak = r.get("fwd_bwd_peak_gb")
        cells.append([r["N"], r["V"], r["impl"], _fmt_ms(r.get("fwd_s")) + (" " + r["fwd_err"] if "fwd_err" in r else ""),
                      pct["fwd"], _fmt_ms(fb) + (" " + r["fwd_bwd_err"] if "fwd_bwd_err" in r else ""), pct["fwd_bwd"],
                      "—" if peak is None else f"{peak:.1f}", speedup])
    return "\n".join(markdown_table(
        ["N", "V", "impl", "fwd ms", "fwd %copy", "fwd+bwd ms", "fwd+bwd %copy", "fwd+bwd peak GB", "vs naive torch"],
        cells, right=[True, True, False] + [True] * 6))


def targets(rows, copy_bw, n=16384, v=151936):
    """The issue's targets at one shape, as plain sentences."""
    by = {r["impl"]: r for r in rows if (r["N"], r["V"]) == (n, v)}
    get = lambda impl: by.get(impl, {}).get("fwd_bwd_s")  # noqa: E731
    out = [f"Targets at N={n}, V={v} (fwd+bwd):"]
    ours_t, ours_j, naive = get("ours_torch"), get("ours_jax"), get("naive_torch")
    for name, s in (("torch op", ours_t), ("JAX op", ours_j)):
        if s:
            out.append(f"- {name}: {100 * 5 * 2 * n * v / s / copy_bw:.0f}% of copy bandwidth (target >= 90%)")
    if ours_t and naive:
        out.append(f"- torch op vs naive torch: {naive / ours_t:.1f}x (target >= 4x)")
    if ours_t and ours_j:
        out.append(f"- JAX op / torch op time: {ours_j / ours_t:.3f} (target <= 1.05)")
    ratios = []
    for (nn, vv) in sorted({(r["N"], r["V"]) for r in rows}):
        pair = {r["impl"]: r.get("fwd_bwd_s") for r in rows if (r["N"], r["V"]) == (nn, vv)}
        if pair.get("ours_torch") and pair.get("ours_jax"):
            ratios.append(f"{nn}x{vv}: {pair['ours_jax'] / pair['ours_torch']:.3f}")
    if ratios:
        out.append("- JAX/torch fwd+bwd time per shape: " + ", ".join(ratios))
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(f"{n}x{v}" for n, v in SHAPES))
    p.add_argument("--frameworks", default="torch,jax")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--impls", default=None, help="comma list (default: all of the framework)")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = p.parse_args()
    shapes = [tuple(int(s) for s in item.split("x")) for item in args.shapes.split(",")]

    if args.worker:
        impls = args.impls.split(",") if args.impls else IMPLS[args.worker]
        info, rows = (torch_worker if args.worker == "torch" else jax_worker)(shapes, impls)
        print("RESULT " + json.dumps(dict(info=info, rows=rows)), flush=True)
        return

    info, rows = {}, []
    for fw in args.frameworks.split(","):
        env = dict(os.environ)
        if fw == "jax":
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
        cmd = [sys.executable, __file__, "--worker", fw, "--shapes", args.shapes]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-3000:])
        result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not result:
            print(f"{fw} worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}", flush=True)
            continue
        res = json.loads(result[-1][len("RESULT "):])
        info.update(res["info"])
        rows += res["rows"]

    env = environment(packages=(), device=info.get("device", info.get("jax_device")) or "unknown")  # the workers'
    info.update(date=env["date"], commit=args.commit or env["commit"], python=env["python"])
    copy_bw = info.get("copy_bw") or info.get("copy_bw_jax")
    if not copy_bw:
        sys.exit("no worker produced results")
    order = {name: i for i, name in enumerate(IMPLS["jax"][:2] + IMPLS["torch"] + IMPLS["jax"][2:])}
    rows.sort(key=lambda r: (r["N"], r["V"], order[r["impl"]]))
    head = (
        f"# soft-CE benchmark, bf16\n\n"
        f"- date {info['date']}, commit {info['commit']}\n"
        f"- device {info.get('device', info.get('jax_device'))}; torch {info.get('torch')}, "
        f"triton {info.get('triton')}, jax {info.get('jax')}\n"
        f"- device-to-device copy: {copy_bw / 1e12:.2f} TB/s (torch, read+write)"
        + (f", {info['copy_bw_jax'] / 1e12:.2f} TB/s (jax elementwise)" if "copy_bw_jax" in info else "")
        + "\n- %copy = minimal bytes (fwd: read x,t; fwd+bwd: read x,t twice + write grad) / time / copy bandwidth\n"
        "- peak GB: torch max_memory_allocated (inputs included); jax XLA memory_analysis "
        "(arguments + outputs + temporaries)\n- time: median of 5 groups of back-to-back calls after warm-up\n"
        "- *_masked: a row mask drops ~10% of rows; %copy still counts every row (the backward skips masked rows)\n\n"
    )
    md = head + table(rows, copy_bw) + "\n\n" + targets(rows, copy_bw) + "\n"
    print(md)
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, "soft_ce.md"), md)
    write_json(os.path.join(args.out, "soft_ce.json"), dict(info=info, rows=rows))


if __name__ == "__main__":
    main()
