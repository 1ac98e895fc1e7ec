"""The OpenAI-compatible server under load: speculative decoding against plain decoding of the same
base model, in one run (issue 28).

    python benchmarks/serve.py --adapter runs/smollm2_k4 [--clients 1,8,32] [--seconds 30] [--dtype bfloat16]
    python benchmarks/serve.py --adapter RUN --smoke --out /tmp/serve_smoke.md      # CPU, tiny run, end to end

For each mode of `--modes` (default `speculative,plain`) it starts `python -m mtp_jax.serve --adapter RUN
--decoding MODE` as a subprocess on 127.0.0.1 (a free port), waits for /v1/models, and then for each
concurrency of `--clients` runs that many concurrent clients (httpx, async), each sending greedy
/v1/chat/completions requests for held-out prompts (`--prompts`, default the shipped held-out set;
client i takes prompts i, i + c, i + 2c, ...) with `max_tokens` `--max_tokens`, one after another,
for `--seconds` (requests started before the end run to completion) or `--requests` per client.
Each server compiles its programs before it answers (`--precompile`, default: the longest of the
prompts, chat-templated, in tokens: every batch size for every padded prompt length up to it); the
report gives each server's time to start. Before each timed phase the same clients make `--warmup`
untimed passes over the prompts (default 1), which then find every program compiled. Warm-up requests
ask for 2 tokens (one decoding call after the prompt's). `--num_prompts` takes the first N prompts
only. The server is then stopped.

Per mode and concurrency: requests/s and completion tokens/s (tokens from each response's `usage`)
over the phase's wall time (first request sent to last response received), latency (mean, p50, p90
of a whole request), tokens per model call (the phase's completion tokens / its model calls, both
from `usage`), the mean per-position draft acceptance (speculative), and the server's batching
(requests per batch). Writes a Markdown report (`--out`, default
benchmarks/results/serve_<date>_<device>.md) with the device (nvidia-smi, else the CPU), commit and
command, and a JSON beside it. Server flags `--max_batch` (default: the largest concurrency, so every
client can share a batch), `--batch_sizes`, `--calls_per_read`, `--dtype`, `--model`, `--step`,
`--batch_wait_ms` pass through.

On a machine whose packages come as wheels installed without their dependencies (`pip install --no-deps`),
the server also needs fastapi's own: starlette, pydantic, pydantic-core, annotated-types,
typing-inspection and opentelemetry-api (fastapi imports it at start).

Every wait is bounded (`--startup_timeout`, `--request_timeout`), and the server subprocess is
stopped at the end of its mode, also on an error, Ctrl-C or SIGTERM. The report is written after every
phase, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, commit, cpu_name, device_tag, fmt, markdown_table, version, write_json, write_text  # noqa: E402


def device_name() -> str:
    """The first GPU's name from nvidia-smi (the server's device), else the CPU's."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return cpu_name()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_prompts(path: str, num: int | None = None) -> list[str]:
    from mtp_jax.data.readers import read_records, resolve_data_file

    texts = [r.input for r in read_records(resolve_data_file(path), require_output=False)]
    texts = texts[:num] if num else texts
    if not texts:
        raise SystemExit(f"error: {path}: no prompts")
    return texts


def _log_tail(log: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def server(args, mode: str, log_dir: Path):
    """`python -m mtp_jax.serve` in `mode` on a free 127.0.0.1 port, up and answering /v1/models; yields
    its base URL. Stopped on leaving (SIGTERM to its process group, SIGKILL after 30 s)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mtp_jax.serve", "--adapter", args.adapter, "--decoding", mode,
           "--host", "127.0.0.1", "--port", str(port), "--max_batch", str(args.max_batch),
           "--max_tokens", str(args.max_tokens), "--batch_wait_ms", str(args.batch_wait_ms),
           "--precompile", str(args.precompile)]
    for flag in ("model", "dtype", "step", "batch_sizes", "calls_per_read"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    log = log_dir / f"server_{mode}.log"
    print(f"[{mode}] {shlex.join(cmd)}  (log: {log})", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the {mode} server exited with status {proc.returncode}:\n{_log_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=5, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {mode} server did not answer within {args.startup_timeout} s:\n"
                                   f"{_log_tail(log)}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Ends the server we started, and its process group, by its id."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


async def _client(http: httpx.AsyncClient, index: int, clients: int, prompts: list[str], max_tokens: int,
                  deadline: float | None, count: int | None, results: list[dict]) -> None:
    """One client: requests one after another until `deadline` (monotonic) or `count` requests."""
    sent, i = 0, index
    while (count is None or sent < count) and (deadline is None or time.monotonic() < deadline):
        body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": max_tokens,
                "temperature": 0.0}
        i, sent = i + clients, sent + 1
        t0 = time.perf_counter()
        try:
            r = await http.post("/v1/chat/completions", json=body)
            ok, payload = r.status_code == 200, r.json()
        except (httpx.HTTPError, ValueError) as e:
            ok, payload = False, {"error": {"message": f"{type(e).__name__}: {e}"}}
        latency = time.perf_counter() - t0
        if ok:
            use = payload["usage"]
            results.append({"latency": latency, "tokens": use["completion_tokens"], "calls": use["model_calls"],
                            "acceptance": use.get("acceptance"), "end": time.perf_counter()})
        else:
            results.append({"error": str(payload.get("error", payload))[:300], "end": time.perf_counter()})


async def load(url: str, clients: int, prompts: list[str], max_tokens: int, seconds: float | None,
               requests: int | None, timeout: float) -> tuple[list[dict], float]:
    """`clients` concurrent clients for `seconds` or `requests` each: (per-request results, wall seconds)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as http:
        results: list[dict] = []
        t0 = time.perf_counter()
        deadline = None if seconds is None else time.monotonic() + seconds
        tasks = [_client(http, i, clients, prompts, max_tokens, deadline, requests, results) for i in range(clients)]
        bound = (seconds or 0) + timeout * (requests or 1) + 60  # no phase outlives its requests' timeouts
        await asyncio.wait_for(asyncio.gather(*tasks), bound)
    return results, max([r["end"] for r in results], default=t0) - t0


def batching(url: str) -> dict:
    return httpx.get(f"{url}/v1/models", timeout=30, trust_env=False).json()["data"][0]["batching"]


def summarize(mode: str, clients: int, results: list[dict], wall: float, before: dict, after: dict) -> dict:
    """One row of the report from a phase's per-request results and the server's batching counters."""
    good = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    lat = sorted(r["latency"] for r in good)
    tokens, calls = sum(r["tokens"] for r in good), sum(r["calls"] for r in good)
    acc = [r["acceptance"] for r in good if r["acceptance"]]
    batches = after["batches"] - before["batches"]
    q = statistics.quantiles(lat, n=10, method="inclusive") if len(lat) > 1 else lat * 9
    return {"mode": mode, "clients": clients, "requests": len(good), "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": wall,
            "requests_per_s": len(good) / wall if wall > 0 else None,
            "tokens_per_s": tokens / wall if wall > 0 else None, "completion_tokens": tokens,
            "tokens_per_request": tokens / len(good) if good else None,
            "latency_mean_s": statistics.fmean(lat) if lat else None,
            "latency_p50_s": statistics.median(lat) if lat else None, "latency_p90_s": q[8] if lat else None,
            "tokens_per_call": tokens / calls if calls else None,
            "acceptance": [statistics.fmean(a) for a in zip(*acc)] if acc else None,
            "requests_per_batch": (after["requests"] - before["requests"]) / batches if batches else None}


def run_mode(args, mode: str, prompts: list[str], log_dir: Path, rows: list[dict], startup: dict,
             save: Callable[[], None]) -> None:
    """Starts the `mode` server (its time to answer into `startup`), measures each concurrency (a row
    each, appended to `rows`, `save` called after each), stops it."""
    t_start = time.perf_counter()
    with server(args, mode, log_dir) as url:
        startup[mode] = round(time.perf_counter() - t_start, 1)
        print(f"[{mode}] answering after {startup[mode]} s (compiling included)", flush=True)
        for c in args.clients:
            if args.warmup:
                t0 = time.perf_counter()
                asyncio.run(load(url, c, prompts, 2, None,
                                 args.warmup * -(-len(prompts) // c), args.request_timeout))
                print(f"[{mode}] {c} clients: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
            before = batching(url)
            results, wall = asyncio.run(load(url, c, prompts, args.max_tokens, args.seconds, args.requests,
                                             args.request_timeout))
            row = summarize(mode, c, results, wall, before, batching(url))
            rows.append(row)
            save()
            print(f"[{mode}] {c} clients: {row['requests']} requests ({row['errors']} failed) in {wall:.1f} s, "
                  f"{fmt(row['requests_per_s'], '.2f')} req/s, {fmt(row['tokens_per_s'], '.1f')} tok/s, "
                  f"p50 {fmt(row['latency_p50_s'], '.2f')} s, {fmt(row['tokens_per_call'], '.2f')} tok/call",
                  flush=True)


def ratio_rows(rows: list[dict], clients: list[int]) -> list[list[str]]:
    """Per concurrency: speculative / plain of tokens/s, requests/s and mean latency."""
    by = {(r["mode"], r["clients"]): r for r in rows}
    out = []
    for c in clients:
        s, p = by.get(("speculative", c)), by.get(("plain", c))
        if s and p:
            cell = lambda key: (f"{s[key] / p[key]:.2f}x" if s[key] and p[key] else "-")  # noqa: E731
            out.append([c, cell("tokens_per_s"), cell("requests_per_s"), cell("latency_mean_s"),
                        cell("latency_p50_s")])
    return out


def markdown(report: dict) -> str:
    env, rows = report["environment"], report["rows"]
    lines = [f"# Server under load: speculative vs plain decoding ({env['date']})", "",
             f"- device: {env['device']}", f"- commit: {env['commit']}",
             f"- versions: jax {env['jax']}, python {env['python']}, httpx {env['httpx']}",
             f"- command: `{report['command']}`",
             f"- adapter: `{report['adapter']}`; {report['prompt_count']} prompts from `{report['prompts']}`, "
             f"greedy, max_tokens {report['max_tokens']}, server max_batch {report['max_batch']}"
             + (f" (batch sizes {report['batch_sizes']})" if report.get("batch_sizes") else "")
             + (f", {report['calls_per_read']} calls a read" if report.get("calls_per_read") else "") + "; "
             + (f"{report['seconds']} s per phase" if report["requests"] is None
                else f"{report['requests']} requests per client")
             + f" after {report['warmup']} warm-up pass(es) over the prompts",
             f"- servers: programs compiled before answering for prompts up to {report['precompile']} tokens; "
             "time to answer: " + (", ".join(f"{m} {t} s" for m, t in report["startup_s"].items()) or "-"),
             *([] if report["complete"] else ["- **incomplete**: the run stopped before its last phase"]),
             "", "## Speculative / plain", "",
             *markdown_table(["clients", "tokens/s", "requests/s", "mean latency", "p50 latency"],
                             ratio_rows(rows, report["clients"]), [True] * 5),
             "", "## Per mode", ""]
    table = [[r["mode"], r["clients"], r["requests"], r["errors"], fmt(r["wall_s"], ".2f"),
              fmt(r["requests_per_s"], ".2f"), fmt(r["tokens_per_s"], ".1f"), fmt(r["tokens_per_request"], ".1f"),
              fmt(r["latency_mean_s"], ".2f"), fmt(r["latency_p50_s"], ".2f"), fmt(r["latency_p90_s"], ".2f"),
              fmt(r["tokens_per_call"], ".2f"),
              " / ".join(f"{a:.2f}" for a in r["acceptance"]) if r["acceptance"] else "-",
              fmt(r["requests_per_batch"], ".1f")] for r in rows]
    lines += markdown_table(["mode", "clients", "requests", "failed", "wall s", "requests/s", "tokens/s",
                             "tokens/request", "mean s", "p50 s", "p90 s", "tokens/call", "acceptance by position",
                             "requests/batch"], table, [False] + [True] * 11 + [False, True])
    errors = [f"- {r['mode']}, {r['clients']} clients: {r['first_error']}" for r in rows if r["first_error"]]
    lines += ["", "Failed requests (first error of each phase):", *errors] if errors else []
    failed = [f"- `{f.splitlines()[0]} ... {f.splitlines()[-1]}`" for f in report["failures"]]
    lines += ["", "Modes that stopped (their remaining rows are missing; the JSON has the server log's tail):",
              *failed] if failed else []
    lines += ["", "Latency: a whole request, sent to last byte. tokens/s: completion tokens (`usage`) per second "
              "of the phase's wall time. tokens/call: the phase's completion tokens / model calls (`usage`); "
              "acceptance: per draft position, the mean over requests of `usage.acceptance`. requests/batch: "
              "the server's batching counters over the phase.", ""]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="training run dir (the server's --adapter)")
    ap.add_argument("--modes", default="speculative,plain", help="server decodings, measured in this order")
    ap.add_argument("--clients", default="1,8,32", help="concurrencies, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0, help="timed phase per concurrency")
    ap.add_argument("--requests", type=int, default=None, help="requests per client instead of --seconds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes over the prompts before each phase")
    ap.add_argument("--num_prompts", type=int, default=None, help="use the first N prompts (default: all)")
    ap.add_argument("--max_tokens", type=int, default=256)
    ap.add_argument("--prompts", default="builtin:heldout_prompts.jsonl", help="prompt file ({'input': ...} records)")
    ap.add_argument("--max_batch", type=int, default=None, help="server --max_batch (default: the largest --clients)")
    ap.add_argument("--batch_sizes", default=None, help="server --batch_sizes (default: the server's)")
    ap.add_argument("--calls_per_read", type=int, default=None, help="server --calls_per_read (default: the server's)")
    ap.add_argument("--batch_wait_ms", type=float, default=2.0, help="server --batch_wait_ms")
    ap.add_argument("--precompile", type=int, default=None,
                    help="server --precompile (default: the longest prompt's tokens, chat-templated)")
    ap.add_argument("--dtype", default=None, help="server --dtype (default: the run's)")
    ap.add_argument("--model", default=None, help="server --model (default: the run's base)")
    ap.add_argument("--step", type=int, default=None, help="server --step")
    ap.add_argument("--startup_timeout", type=float, default=900.0, help="seconds a server may take to answer")
    ap.add_argument("--request_timeout", type=float, default=600.0, help="seconds one request may take")
    ap.add_argument("--out", default=None,
                    help="Markdown report (default benchmarks/results/serve_<date>_<device>.md); the JSON beside it")
    ap.add_argument("--smoke", action="store_true", help="1 and 2 clients, 2 requests each, 16 tokens (CPU, tiny run)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.clients, args.requests, args.seconds, args.max_tokens, args.warmup = "1,2", 2, None, 16, 1
        args.num_prompts = args.num_prompts or 4
    elif args.requests is not None:
        args.seconds = None
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.clients or min(args.clients) < 1:
        ap.error("--clients: one or more concurrencies >= 1")
    if not args.modes or set(args.modes) - {"speculative", "plain"}:
        ap.error("--modes: speculative and/or plain")
    if (args.requests is not None and args.requests < 1) or (args.seconds is not None and args.seconds <= 0) \
            or args.max_tokens < 1 or args.warmup < 0 or (args.num_prompts is not None and args.num_prompts < 1):
        ap.error("--requests, --seconds, --max_tokens and --num_prompts must be positive, --warmup >= 0")
    args.max_batch = args.max_batch or max(args.clients)
    args.adapter = str(Path(args.adapter).expanduser().resolve())
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = device_name()
    if args.out is None:
        stem = f"serve_{datetime.date.today().isoformat()}_{device_tag(device)}"
        args.out = str(Path(tempfile.mkdtemp()) / "serve_smoke.md") if args.smoke \
            else str(ROOT / "benchmarks" / "results" / f"{stem}.md")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(args.prompts, args.num_prompts)
    env = {"device": device, "jax": version("jax"), "httpx": version("httpx"),
           "python": sys.version.split()[0], "commit": commit(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.precompile is None:
        args.precompile = longest_prompt(args.adapter, prompts)
    # SIGTERM (a time limit) unwinds like Ctrl-C: each server is stopped and the report keeps what was measured
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows, failures, startup = [], [], {}
    command = shlex.join(["python", "benchmarks/serve.py", *(sys.argv[1:] if argv is None else argv)])

    def save(complete: bool = False) -> dict:
        report = {"environment": env, "command": command, "complete": complete,
                  "adapter": args.adapter, "prompts": args.prompts, "prompt_count": len(prompts),
                  "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                  "batch_sizes": args.batch_sizes, "calls_per_read": args.calls_per_read,
                  "precompile": args.precompile,
                  "startup_s": startup, "clients": args.clients, "seconds": args.seconds, "requests": args.requests,
                  "warmup": args.warmup, "rows": rows, "failures": failures}
        write_text(out, markdown(report))
        write_json(out.with_suffix(".json"), report)
        return report

    try:
        with tempfile.TemporaryDirectory(prefix="serve_bench_") as logs:
            for mode in args.modes:
                try:
                    run_mode(args, mode, prompts, Path(logs), rows, startup, save)
                except (RuntimeError, OSError, TimeoutError, httpx.HTTPError) as e:  # the next mode may still run
                    print(f"[{mode}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    failures.append(f"{mode}: {type(e).__name__}: {str(e)[-2000:]}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = save(complete=True)
    print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)
    return report


def longest_prompt(adapter: str, prompts: list[str]) -> int:
    """The token count of the longest prompt as the server's chat endpoint encodes it (the run's tokenizer)."""
    from transformers import AutoTokenizer

    from mtp_jax.decoding.request import encode_chat

    tok = AutoTokenizer.from_pretrained(Path(adapter) / "tokenizer")  # the run's, as mtp_jax.checkpoints loads it
    return max(len(encode_chat(tok, [{"role": "user", "content": p}])) for p in prompts)


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
