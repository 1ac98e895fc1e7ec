"""Speculative decoding with a trained run's drafts vs plain greedy decoding of the same model.

    python benchmarks/speculative.py --adapter runs/smollm2_k4 [--model DIR] [--dtype bfloat16]
    python benchmarks/speculative.py --random configs/models/qwen3-8b.json --dtype bfloat16

On held-out prompts (code, math, chat; never in the training data): tokens per model call,
acceptance rate by draft position, wall-clock tokens/s against plain greedy JAX decoding measured
in the same run, at batch 1 and 8, for each mask-block layout asked for (`--layouts`). Every
speculative output is checked token for token against the plain one. Writes
benchmarks/results/speculative_<date>_<device>.{md,json,png}.

`--random CONFIG.json` measures cost alone, for any model shape without its weights: random base and
adapters, random prompts, no EOS. Acceptance is then meaningless; the figure that matters is the
break-even (speculative ms per call over plain ms per call): the tokens/step an adapter must reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from mtp_jax.decoding.adapter import DRAFT_VOCAB_DEFAULT, MERGED_DEFAULT, load_adapter
from mtp_jax.decoding.cli import compile_seconds
from mtp_jax.decoding.layout import layout_name, plain_of, prepare
from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.request import encode_prompt, eos_ids_of, pad_id_of
from mtp_jax.decoding.speculative import speculative_generate
from mtp_jax.models.llama import CausalLM

DOMAINS = ("code", "math", "chat")
RANDOM_PROMPT_TOKENS = 48  # about a chat-templated held-out prompt


@dataclasses.dataclass
class Measured:
    tokens: int = 0
    seconds: float = 0.0  # wall time without compilation
    compile_s: float = 0.0
    steps: int = 0  # model calls summed over rows (plain: one per token)
    calls: int = 0  # model calls of the batch (while_loop iterations + the prompt call)
    accepted: np.ndarray | None = None
    offered: np.ndarray | None = None
    mismatches: int = 0  # prompts whose output differs from plain greedy

    def add_counts(self, accepted, offered):
        self.accepted = accepted if self.accepted is None else self.accepted + accepted
        self.offered = offered if self.offered is None else self.offered + offered

    def acceptance(self) -> list[float]:
        return (self.accepted / np.maximum(self.offered, 1)).round(4).tolist()


def timed(fn):
    with compile_seconds() as compiling:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    return out, wall - compiling[0], compiling[0]


def read_prompts(path: str, per_domain: int) -> dict[str, list[str]]:
    from mtp_jax.data.readers import resolve_data_file

    by_domain = {d: [] for d in DOMAINS}
    with open(resolve_data_file(path), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("category") in by_domain and len(by_domain[rec["category"]]) < per_domain:
                by_domain[rec["category"]].append(rec["input"])
    return by_domain


def random_setup(config_path: str, dtype: str, k: int, per_domain: int):
    """MTPModel (LoRA r16 on all projections, k drafts) with random base and adapters at the config's shapes."""
    import jax.numpy as jnp

    from mtp_step import random_base  # benchmarks/ is the script's directory
    from mtp_jax.models import LoRAConfig, ModelConfig
    from mtp_jax.mtp.model import MTPConfig, MTPModel
    from mtp_jax.mtp.objective import init_params

    config = ModelConfig.from_file(config_path)
    dt = jnp.dtype(dtype or "bfloat16")
    model = MTPModel(config, LoRAConfig(rank=16, alpha=32.0), MTPConfig(draft_length=k), dt, dt)
    base = random_base(CausalLM(config, None, dt, dt))
    params = init_params(model, base, jnp.zeros((config.hidden_size,), jnp.float32), jax.random.key(0))
    rng = np.random.default_rng(0)
    params["lora"] = jax.tree.map(lambda x: jnp.asarray(0.01 * rng.standard_normal(x.shape), x.dtype), params["lora"])
    ids = {"random": [rng.integers(0, config.vocab_size, RANDOM_PROMPT_TOKENS).tolist() for _ in range(per_domain)]}
    return model, params, ids


def parse_layout(text: str) -> tuple[int, ...] | None:
    return None if text == "all" else tuple(int(a) for a in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", help="training run dir")
    ap.add_argument("--random", help="HF config.json: cost only, random weights at its shapes")
    ap.add_argument("--k", type=int, default=4, help="drafts per step with --random")
    ap.add_argument("--draft_vocab", type=int, default=None, metavar="N",
                    help="with --adapter: drafts from the run's N most frequent response tokens (load_adapter; "
                         f"default: {DRAFT_VOCAB_DEFAULT})")
    ap.add_argument("--model", default=None, help="base model path (default: the run's)")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the run's)")
    ap.add_argument("--prompts", default="builtin:heldout_prompts.jsonl")
    ap.add_argument("--per_domain", type=int, default=8, help="prompts per domain (the first N of each)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--batch_sizes", default="1,8")
    ap.add_argument("--layouts", default="all,0", help="mask-block anchor offsets per layout, ';'-separated "
                                                       "lists or 'all' (quadratic), e.g. 'all;0;0,4'")
    ap.add_argument("--out_dir", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="file name tag (default: <date>_<device>)")
    ap.add_argument("--merged", action=argparse.BooleanOptionalAction, default=None,
                    help="the merged decoding layout (layout.prepare): one matmul per projection, twice the adapted "
                         f"kernels' bytes (default: {MERGED_DEFAULT})")
    ap.add_argument("--trace_dir", default=None, help="also profile one batch-1 generation per method: GPU "
                                                      "kernels per model call and their time by kind")
    args = ap.parse_args(argv)
    if (args.adapter is None) == (args.random is None):
        ap.error("pass one of --adapter RUN_DIR or --random CONFIG.json")
    if args.draft_vocab and args.random:
        ap.error("--draft_vocab takes the run's token counts: pass --adapter")

    if args.random:
        model, params, ids = random_setup(args.random, args.dtype, args.k, args.per_domain)
        eos, pad_id = [-1], 0
    else:
        model, params, tokenizer = load_adapter(args.adapter, args.model, args.step, args.dtype, args.draft_vocab,
                                                args.merged)
        eos = eos_ids_of(tokenizer, model.config)
        pad_id = pad_id_of(tokenizer, eos)
        prompts = read_prompts(args.prompts, args.per_domain)
        ids = {d: [encode_prompt(tokenizer, t, chat=True) for t in texts] for d, texts in prompts.items()}
    # the decoding layout (unstacked layers, folded adapters) is built once here, outside the timings
    model, params = prepare(model, params, args.merged)
    lm, base = plain_of(model, params)
    domains = list(ids)
    layouts = args.layouts.replace(";", " ").split() if ";" in args.layouts else args.layouts.split(",")
    layouts = [lay for lay in layouts if lay]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    device = jax.devices()[0]
    k = model.mtp.draft_length
    n = args.max_new_tokens

    results = []  # one row per (batch, method, domain)
    for b in batch_sizes:
        for domain in domains:
            rows = ids[domain]
            plain, specs = Measured(), {layout: Measured() for layout in layouts}
            # each batch runs plain and then every layout, so a change of machine load hits all alike
            for batch in (rows[i:i + b] for i in range(0, len(rows), b)):
                out, s, c = timed(lambda: generate(lm, base, batch, n, eos, pad_id=pad_id))
                plain.tokens, plain.steps = plain.tokens + sum(map(len, out)), plain.steps + sum(map(len, out))
                plain.seconds, plain.compile_s = plain.seconds + s, plain.compile_s + c
                plain.calls += max(map(len, out))
                for layout, spec in specs.items():
                    res, s, c = timed(lambda: speculative_generate(model, params, batch, n, eos, pad_id=pad_id,
                                                                   anchors=parse_layout(layout)))
                    spec.tokens += sum(map(len, res.tokens))
                    spec.seconds, spec.compile_s = spec.seconds + s, spec.compile_s + c
                    spec.steps += int(res.steps.sum())
                    spec.calls += int(res.steps.max())
                    spec.add_counts(res.accepted.sum(0), res.offered.sum(0))
                    spec.mismatches += sum(a != r for a, r in zip(res.tokens, out))
            results.append({"batch": b, "method": "plain", "domain": domain, **_row(plain)})
            for layout, spec in specs.items():
                results.append({"batch": b, "method": f"spec[{layout}]", "domain": domain, **_row(spec),
                                "accepted": spec.accepted.tolist(), "offered": spec.offered.tolist(),
                                "acceptance": spec.acceptance()})
                print(f"b={b} {domain:5s} {layout:>5s}: {spec.tokens / spec.steps:.2f} tokens/step, "
                      f"{spec.tokens / spec.seconds:.1f} vs {plain.tokens / plain.seconds:.1f} tokens/s plain, "
                      f"acceptance {spec.acceptance()}, mismatches {spec.mismatches}", flush=True)

    profile = None
    if args.trace_dir:
        first = [ids[domains[0]][0]]
        runs = {"plain": (lambda: generate(lm, base, first, n, eos, pad_id=pad_id),
                          lambda out: max(map(len, out)))}
        for layout in layouts:
            runs[f"spec[{layout}]"] = (lambda lay=layout: speculative_generate(
                model, params, first, n, eos, pad_id=pad_id, anchors=parse_layout(lay)),
                lambda res: int(res.steps.max()))
        profile = profile_calls(args.trace_dir, runs)
        for name, p in profile.items():
            print(f"profile {name}: {p['calls']} calls, {p['kernels_per_call']:.0f} GPU kernels and "
                  f"{sum(p['ms_per_call'].values()):.2f} ms of kernel time per call {p['ms_per_call']}", flush=True)
            for kernel, (count, us) in p["top_kernels"].items():
                print(f"    {count:7.2f} x {kernel:60s} {us:8.1f} us/call", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    kind = device.device_kind if device.platform != "cpu" else f"cpu ({os.cpu_count()} cores)"
    short = "cpu" if device.platform == "cpu" else device.device_kind.split()[1].lower()  # "NVIDIA H100 ..." -> h100
    tag = args.tag or f"{datetime.date.today()}_{short}"
    source = f"random weights at the shapes of {args.random}" if args.random else args.model or "the run's base"
    report = {"device": kind, "jax": jax.__version__, "commit": commit, "adapter": args.adapter or "random",
              "model": source, "domains": domains, "dtype": str(np.dtype(model.dtype)), "k": k,
              "draft_vocab": len(params["draft_vocab"]) if "draft_vocab" in params else None,
              "layout": layout_name(model),
              "max_new_tokens": n, "prompts": args.prompts, "per_domain": args.per_domain,
              "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])), "results": results,
              "profile": profile}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speculative_{tag}.json").write_text(json.dumps(report, indent=1))
    (out / f"speculative_{tag}.md").write_text(markdown(report, layouts, batch_sizes, tag))
    plot(report, layouts, batch_sizes, out / f"speculative_{tag}.png")
    print(markdown(report, layouts, batch_sizes, tag))


def profile_calls(trace_dir: str, runs: dict, n_kernels: int = 40) -> dict:
    """name -> {calls, GPU kernels per model call, ms of kernel time per call by kind} from one traced
    run of each (fn, calls_of_output) in `runs`, after an untraced one (compilation stays out)."""
    from train_step import kernel_events, kernel_stats

    out = {}
    for name, (fn, calls_of) in runs.items():
        fn()
        path = f"{trace_dir}/{re.sub(r'[^A-Za-z0-9_-]', '_', name)}"
        with jax.profiler.trace(path):
            calls = calls_of(jax.block_until_ready(fn()))
        seconds, counts, top = kernel_stats(kernel_events(path), n_kernels)
        out[name] = {"calls": calls, "kernels_per_call": sum(counts.values()) / calls,
                     "ms_per_call": {kind: round(1e3 * s / calls, 4) for kind, s in seconds.items()},
                     "top_kernels": {kernel: [round(c / calls, 2), round(1e6 * s / calls, 1)]  # per call: count, us
                                     for kernel, (c, s) in top.items()}}
    return out


def _row(m: Measured) -> dict:
    return {"tokens": m.tokens, "seconds": round(m.seconds, 3), "compile_s": round(m.compile_s, 1), "steps": m.steps,
            "calls": m.calls, "tokens_per_step": round(m.tokens / max(m.steps, 1), 3),
            "ms_per_call": round(1e3 * m.seconds / max(m.calls, 1), 2),
            "tokens_per_s": round(m.tokens / max(m.seconds, 1e-9), 2), "mismatches": m.mismatches}


def _total(rows: list[dict]) -> dict:
    """Sums over domains of one (batch, method)."""
    tokens, seconds, steps, calls = (sum(r[key] for r in rows) for key in ("tokens", "seconds", "steps", "calls"))
    out = {"tokens": tokens, "seconds": seconds, "tokens_per_step": tokens / max(steps, 1),
           "ms_per_call": 1e3 * seconds / max(calls, 1),
           "tokens_per_s": tokens / max(seconds, 1e-9), "mismatches": sum(r["mismatches"] for r in rows)}
    if "accepted" in rows[0]:
        acc, off = (np.sum([r[key] for r in rows], 0) for key in ("accepted", "offered"))
        out["acceptance"] = (acc / np.maximum(off, 1)).tolist()
    return out


def markdown(report: dict, layouts: list[str], batch_sizes: list[int], tag: str) -> str:
    res, domains = report["results"], report["domains"]
    pick = lambda b, m, d=None: [r for r in res if r["batch"] == b and r["method"] == m and d in (None, r["domain"])]
    lines = [f"# Speculative decoding vs plain greedy ({tag})", "",
             f"Device: {report['device']}, jax {report['jax']}, commit {report['commit']}, dtype {report['dtype']}.",
             f"Adapter: `{report['adapter']}` (k = {report['k']}), base: {report['model']}. Prompts: "
             + (f"{report['per_domain']} random ones of {RANDOM_PROMPT_TOKENS} tokens, no EOS" if domains == ["random"]
                else f"the first {report['per_domain']} code, math and chat prompts of `{report['prompts']}` "
                     "(held out from training), chat template")
             + f", up to {report['max_new_tokens']} new tokens, greedy.",
             f"Command: `python {report['command']}`", "",
             "tokens/step = generated tokens / model calls (the prompt's call included; plain decoding: 1 per row). "
             "Time excludes compilation (measured and subtracted). Layout `all` = a mask block after every "
             "candidate anchor ((k+1)k masks per call, k drafts every step); `0` = one block after t_0 (k masks; "
             "after n accepted drafts only k - n drafts are left). ms/call = wall time per model call of the "
             "batch; break-even = speculative ms/call over plain ms/call, the tokens/step a layout needs to "
             "match plain decoding; speedup by domain = tokens/s over plain's on the same prompts. Acceptance at draft position j = the share of the steps offering a j-th draft "
             "in which drafts 1..j were all accepted. mismatches = prompts whose output differs from plain greedy.",
             ""]
    for b in batch_sizes:
        plain = _total(pick(b, "plain"))
        lines += [f"## Batch {b}", "",
                  f"| method | tokens/step | {' | '.join(domains)} | ms/call | break-even | tokens/s | speedup | "
                  f"{' | '.join(d + ' speedup' for d in domains)} | acceptance by draft position | mismatches |",
                  "|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|" + "---:|" * len(domains) + "---|---:|",
                  f"| plain greedy | 1.00 | {'| ' * len(domains)}{plain['ms_per_call']:.1f} | | "
                  f"{plain['tokens_per_s']:.1f} | 1.00x | {'| ' * len(domains)}| |"]
        for layout in layouts:
            m = f"spec[{layout}]"
            tot = _total(pick(b, m))
            per = [pick(b, m, d)[0]["tokens_per_step"] for d in domains]
            acc = " ".join(f"{a:.2f}" for a in tot["acceptance"])
            lines.append(f"| speculative, layout `{layout}` | {tot['tokens_per_step']:.2f} | "
                         + " | ".join(f"{p:.2f}" for p in per)
                         + f" | {tot['ms_per_call']:.1f} | {tot['ms_per_call'] / plain['ms_per_call']:.2f}"
                         + f" | {tot['tokens_per_s']:.1f} | {tot['tokens_per_s'] / plain['tokens_per_s']:.2f}x | "
                         + " | ".join(f"{pick(b, m, d)[0]['tokens_per_s'] / pick(b, 'plain', d)[0]['tokens_per_s']:.2f}x"
                                      for d in domains)
                         + f" | {acc} | "
                           f"{tot['mismatches']} |")
        lines.append("")
    if report.get("profile"):
        lines += ["## Per model call, batch 1 (one traced generation of the first prompt)", "",
                  "| method | calls | GPU kernels per call | kernel ms per call | by kind |",
                  "|---|---:|---:|---:|---|"]
        for name, p in report["profile"].items():
            kinds = ", ".join(f"{kind} {ms:.3f}" for kind, ms in p["ms_per_call"].items())
            ms = sum(p["ms_per_call"].values())
            lines.append(f"| {name} | {p['calls']} | {p['kernels_per_call']:.0f} | {ms:.3f} | {kinds} |")
        lines.append("")
        names = list(dict.fromkeys(kernel for p in report["profile"].values() for kernel in p.get("top_kernels", {})))
        if names:  # the most frequent kernels of any method, side by side
            methods = list(report["profile"])
            lines += ["Most frequent GPU kernels per call (count, microseconds):", "",
                      "| kernel | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
            for kernel in names[:25]:
                cells = [report["profile"][m].get("top_kernels", {}).get(kernel) for m in methods]
                lines.append(f"| `{kernel}` | " + " | ".join(f"{c[0]:.0f}, {c[1]:.0f} us" if c else "" for c in cells)
                             + " |")
            lines.append("")
    return "\n".join(lines)


def plot(report: dict, layouts: list[str], batch_sizes: list[int], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, domains = [r for r in report["results"] if r["batch"] == batch_sizes[0]], report["domains"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    main = f"spec[{layouts[0]}]"
    for domain in domains:
        row = next(r for r in res if r["method"] == main and r["domain"] == domain)
        ax1.plot(range(1, report["k"] + 1), row["acceptance"], marker="o", label=domain)
    ax1.set(xlabel="draft position", ylabel="acceptance rate", title=f"Drafts accepted (layout {layouts[0]})",
            xticks=range(1, report["k"] + 1), ylim=(0, 1))
    ax1.legend()
    width = 0.8 / len(layouts)
    for i, layout in enumerate(layouts):
        vals = [next(r for r in res if r["method"] == f"spec[{layout}]" and r["domain"] == d)["tokens_per_step"]
                for d in domains]
        ax2.bar(np.arange(len(domains)) + i * width, vals, width, label=f"layout {layout}")
    ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set(xticks=np.arange(len(domains)) + width * (len(layouts) - 1) / 2, xticklabels=domains,
            ylabel="tokens per model call", title="Tokens per step by domain")
    ax2.legend()
    fig.suptitle(f"{report['adapter']} (k={report['k']}) on {report['device']}, batch {batch_sizes[0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
