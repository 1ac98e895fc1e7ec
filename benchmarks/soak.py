"""Kill/resume soak: training runs SIGKILLed at random times, resumed, compared with an uninterrupted run.

    python benchmarks/soak.py --cycles 8 [--steps 6] [--seed 0] [--out benchmarks/results/soak_DATE.md]

One uninterrupted run of configs/tiny_test.yaml (on the shipped SmolLM2 self-distillation data) is the
baseline, run first in its own process. Each cycle then starts a fresh run directory and data cache
and runs the same command with `--resume` again and again: the first 1-3 invocations are SIGKILLed
after a random delay drawn uniformly over the baseline's wall time (so kills land in imports, the
data cache build, model setup and compile, steps and async checkpoint saves alike), the last runs to
the end. The window follows the machine's load: when a cycle's first invocation (a fresh run)
finishes before its kill, its wall time becomes the window. With --tear, after a kill that leaves two or more committed checkpoints, the newest one's
array files are truncated as well (a torn file the fallback must skip). A cycle survives when its
metrics.jsonl (one row per step, as the resumed runs leave it) and final params equal the baseline's
bit for bit. Prints a table per cycle and a summary; --out writes them as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mtp_jax.checkpoints import committed_steps, restore_trainable
from _report import ROOT, cpu_name, environment, markdown_table, write_text
TRAJECTORY = ("loss/", "acc/", "accept_len", "grad_norm", "lr", "skipped", "nonfinite")


def command(ws: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "mtp_jax.train", "--config", str(ROOT / "configs" / "tiny_test.yaml"),
            "--data.cache_dir", str(ws / "cache"), "--train.save_dir", str(ws / "run"),
            "--train.max_steps", str(steps), "--train.save_steps", "2", "--train.save_limit", "3",
            "--train.async_checkpointing", "true", "--resume"]


def env(compile_cache: Path) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "TOKENIZERS_PARALLELISM": "false"}


def leftovers(ws: Path) -> set[str]:
    """Temp folders of an unfinished data cache build or checkpoint save."""
    return {p.name for p in (ws / "cache").glob(".tmp-*")} | \
        {p.name for p in (ws / "run" / "checkpoints").glob("*orbax-checkpoint-tmp*")}


def phase(stderr: str, new_leftovers: set[str]) -> str:
    """Where a kill landed, from the run's last log line and the temp folders it left."""
    lines = [line for line in stderr.splitlines() if line.startswith("[train] ")]
    last = lines[-1][8:] if lines else ""
    if any(name.startswith(".tmp-") for name in new_leftovers):
        return "data cache build (temp folder left)"
    after = last.split(":")[0] if last.startswith("step") else "compile"
    if new_leftovers:
        return f"async checkpoint save after {after} (uncommitted step left)"
    if not last:
        return "startup (imports, config)"
    if last.startswith("mesh"):
        return "data cache, tokenizer or base model"
    if last.startswith(("model", "--resume", "resumed", "checkpoint step", "resuming")):
        return "setup, restore or compile"
    if last.startswith(("compiled", "step")):
        return f"training, after {after}"
    return last[:50]


def tear_newest(ws: Path) -> int | None:
    steps = committed_steps(ws / "run")
    if len(steps) < 2:
        return None
    for f in (ws / "run" / "checkpoints" / str(steps[-1])).rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])
    return steps[-1]


def result(ws: Path) -> tuple[dict, list]:
    """({step: trajectory metrics}, final params as numpy leaves) of a finished run."""
    rows = [json.loads(line) for line in open(ws / "run" / "metrics.jsonl")]
    rows = [r for r in rows if "loss/total" in r]  # training rows, not eval ones
    if len({r["step"] for r in rows}) != len(rows):
        raise ValueError(f"{ws}/run/metrics.jsonl: a step written twice: {[r['step'] for r in rows]}")
    traj = {r["step"]: {k: v for k, v in r.items() if k.startswith(TRAJECTORY)} for r in rows}
    return traj, jax.tree.leaves(restore_trainable(ws / "run")[1])


def same(a: tuple[dict, list], b: tuple[dict, list]) -> tuple[bool, str]:
    if a[0] != b[0]:
        bad = [s for s in sorted(set(a[0]) | set(b[0])) if a[0].get(s) != b[0].get(s)]
        return False, f"metrics differ at steps {bad}"
    if not all(np.array_equal(x, y) for x, y in zip(a[1], b[1])):
        return False, "final params differ"
    return True, "identical"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tear", action="store_true", help="also truncate the newest checkpoint after some kills")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mtp_soak_"))
    child_env = env(work / "jax_cache")

    t0 = time.time()
    base = work / "baseline"
    proc = subprocess.run(command(base, args.steps), env=child_env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"baseline run failed:\n{proc.stderr[-3000:]}")
    baseline_s = time.time() - t0
    proc = subprocess.run(command(work / "warm", args.steps), env=child_env, capture_output=True, text=True)
    warm_s = time.time() - t0 - baseline_s  # with the compile cache the baseline filled: what a resume pays
    if proc.returncode != 0:
        sys.exit(f"second uninterrupted run failed:\n{proc.stderr[-3000:]}")
    baseline = result(base)
    rerun = same(result(work / "warm"), baseline)[1]
    print(f"baseline: {args.steps} steps in {baseline_s:.1f} s (cold compile), {warm_s:.1f} s warm; "
          f"loss {baseline[0][1]['loss/total']:.4f} -> {baseline[0][args.steps]['loss/total']:.4f}; "
          f"second uninterrupted run: {rerun}", flush=True)

    rows, survived, kills_total, window = [], 0, 0, warm_s
    for cycle in range(1, args.cycles + 1):
        ws = work / f"cycle{cycle}"
        kills = []
        for attempt in range(rng.randint(1, 3)):
            delay = rng.uniform(0.0, window)
            before, started = leftovers(ws), time.time()
            p = subprocess.Popen(command(ws, args.steps), env=child_env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            while p.poll() is None and time.time() - started < delay:
                time.sleep(0.02)
            finished = p.poll() is not None
            if not finished:
                p.send_signal(signal.SIGKILL)
            err = p.communicate()[1]
            if finished:
                kills.append(f"{delay:.1f}s: finished before the kill")
                if attempt == 0:  # a whole fresh run took this long: the machine is faster than the window
                    window = time.time() - started
                break
            kills_total += 1
            where = phase(err, leftovers(ws) - before)
            torn = tear_newest(ws) if args.tear and rng.random() < 0.5 else None
            kills.append(f"{delay:.1f}s: {where}" + (f", then tore step {torn}" if torn else ""))
        t = time.time()
        final = subprocess.run(command(ws, args.steps), env=child_env, capture_output=True, text=True)
        if final.returncode != 0:
            ok, why = False, f"final invocation failed: {final.stderr.strip().splitlines()[-1][:120]}"
        else:
            try:
                ok, why = same(result(ws), baseline)
            except Exception as e:  # a missing or garbled metrics file counts as not surviving
                ok, why = False, f"{type(e).__name__}: {e}"
        survived += ok
        rows.append((cycle, kills, f"{time.time() - t:.1f}", why))
        print(f"cycle {cycle}: {len(kills)} kill(s) [{'; '.join(kills)}] -> {why}", flush=True)
        shutil.rmtree(ws, ignore_errors=True)

    summary = (f"survived {survived}/{args.cycles} cycles with identical results "
               f"({kills_total} SIGKILLs in all; {args.steps} steps, checkpoint every 2)")
    print(summary)
    if args.out:
        write_report(args, rows, summary, baseline_s, warm_s, baseline, rerun)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if survived == args.cycles else 1


def write_report(args, rows, summary, baseline_s, warm_s, baseline, rerun):
    env = environment(("jax", "orbax-checkpoint", "grain"), device=cpu_name())
    lines = [
        f"# Kill/resume soak, {env['date']}",
        "",
        f"`python benchmarks/soak.py --cycles {args.cycles} --steps {args.steps} --seed {args.seed}"
        + (" --tear" if args.tear else "") + "`",
        "",
        f"Commit {env['commit']}; {env['device']} (shared with other jobs, load average "
        f"{os.getloadavg()[0]:.1f} at the end); jax {env['jax']}, orbax-checkpoint {env['orbax-checkpoint']}, "
        f"grain {env['grain']}, Python {env['python']}.",
        "",
        f"Baseline (uninterrupted, its own process): configs/tiny_test.yaml on the shipped SmolLM2 data, "
        f"{args.steps} steps, async checkpoint every 2; {baseline_s:.1f} s with a cold compile, {warm_s:.1f} s "
        f"warm; loss {baseline[0][1]['loss/total']:.4f} -> {baseline[0][args.steps]['loss/total']:.4f}. "
        f"A second uninterrupted run in another process: {rerun}. Kill delays are uniform over the warm time "
        "(shrunk to a fresh run's time when one finished before its kill); each cycle uses a fresh run directory "
        "and data cache.",
        "",
        f"**{summary}**",
        "",
        *markdown_table(["cycle", "kills (delay: where it landed)", "final invocation (s)",
                         "vs baseline (metrics.jsonl + params)"], [[c, "<br>".join(k), t, why] for c, k, t, why in rows]),
    ]
    write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
