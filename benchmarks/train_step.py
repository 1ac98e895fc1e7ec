"""The whole training step (MTP loss, grads, AdamW update) at 8B shapes, random init: tokens/s, MFU
(SPEC §11, attention included), peak memory, a breakdown, and the straightforward baseline beside it.

    python benchmarks/train_step.py --model configs/models/qwen3-8b.json configs/models/llama-3.1-8b.json \
        --lengths 8192 16384 --data one_example packed_mix --out results.json --trace_dir /tmp/traces
    python benchmarks/train_step.py --smoke --out /tmp/smoke.json  # tiny shapes, any device (the CPU test)

Rows per model, row length and `--data`:
- `one_example`: one example a row, 512 prompt tokens + the response, every response token an anchor;
- `packed_mix`: rows of that length packed with examples as users have them (`packed_mix`): responses
  log-normal with median 600 and 95th percentile 4000 tokens, prompts uniform 50-500, seeded.
Each row: `step`, `mtp_jax.train.train_step` exactly as the CLI jits it (AdamW, clipping, non-finite guard),
with float32 trainables over the bf16 base (`--trainable_dtype`, as the 8B configs); and at its top level
`model`, `regular_tokens` (the row length), `data`, `time_s`, `tokens_per_s` (real regular tokens),
`mfu`, `peak_gib`, `compile_s` (of it `lower_s`: tracing and lowering in Python, before XLA). Besides:
- breakdown by subtraction of separately compiled programs: the regular stream alone (forward under
  stop_gradient), loss+grads (regular + mask stream forward/backward), and the optimizer = step -
  loss+grads; and, with --trace_dir, GPU kernel time by kind (matmul, attention, soft-CE kernel,
  other fusions), by source line (`top_sources`) and the time the GPU ran no kernel (`gpu_idle_s`),
  read from a `jax.profiler` trace of one more run of the step's timed executable;
- `baseline` (one_example rows): the same step written the straightforward way (interleaved sequence,
  dense mask, XLA softmax CE: `benchmarks/mtp_step.py`'s `interleaved_loss`) with the same optimizer, up
  to --baseline_max; every figure is printed as a ratio against it.
GPU only at 8B shapes; --smoke (or a tiny --model config.json) runs it on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import re
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import ProfileData

from mtp_jax.flops import device_peak_flops, step_flops
from mtp_jax.models import LoRAConfig, ModelConfig
from mtp_jax.models.llama import CausalLM
from mtp_jax.mtp.model import MTPConfig, MTPModel
from mtp_jax.mtp.objective import init_params, loss_and_grads, regular_stream, split_params, training_layout
from mtp_jax.train.config import OptimConfig
from mtp_jax.train.step import make_optimizer, train_step
from _report import environment, fmt, header, ratio, write_json
from mtp_step import interleaved_layout, interleaved_loss, make_batch, random_base
from mtp_step import OPTIMIZED_HLO, measure as measure_fn

DATA = ("one_example", "packed_mix")
# --smoke: a tiny Llama, rows of 64 tokens, the mix scaled down to fit them, no breakdown (compiles are most of it)
SMOKE_MODEL = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
SMOKE_ARGS = dict(lengths=[64], prompt=16, chunk=16, rank=4, impl="xla", remat="none", dtype="float32", reps=1,
                  baseline_max=64, breakdown_max=0, median=12.0, p95=40.0, prompt_range=[4, 12], data=list(DATA))

# GPU kernel names by kind (cuBLAS/CUTLASS/nvjet GEMMs, cuDNN/flash attention, our Triton soft-CE)
KINDS = (("attention", r"fmha|flash|cudnn|attention|sdpa"), ("soft-CE kernel", r"soft_ce"),
         ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|matmul|dot"), ("other (fusions, copies)", r""))


def kernel_events(trace_dir: str) -> list[tuple[str, float, float]]:
    """(name, start_s, end_s) of every GPU kernel in the newest trace under `trace_dir` (none without a GPU):
    one read of the trace for `kernel_stats`, `kernel_sources` and `busy_and_span`."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    return [(event.name, event.start_ns * 1e-9, event.end_ns * 1e-9)
            for plane in ProfileData.from_file(path).planes if plane.name.startswith("/device:GPU")
            # kernel launches; "XLA Ops"/"XLA Modules" would double count
            for line in plane.lines if line.name.startswith("Stream")
            for event in line.events]


def busy_and_span(intervals) -> tuple[float, float]:
    """(time some kernel runs, first start to last end) of (start, end) intervals from any streams: the
    span less the busy time is when the GPU ran nothing (waiting on the host, a sync or a launch)."""
    spans = sorted(intervals)
    if not spans:
        return 0.0, 0.0
    busy, reach = 0.0, spans[0][0]  # reach: the latest end so far
    for start, end in spans:
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy, reach - spans[0][0]


def kernel_stats(events: list[tuple[str, float, float]], top: int = 40, by_time: bool = False
                 ) -> tuple[dict[str, float], dict[str, int], dict[str, tuple]]:
    """From a trace's `kernel_events` (empty without a GPU): GPU kernel seconds and kernel counts by kind,
    and the `top` kernels by count (`by_time`: by seconds), largest first: name without its numeric
    suffixes -> (count, seconds)."""
    seconds, counts, names = defaultdict(float), defaultdict(int), defaultdict(lambda: [0, 0.0])
    for name, start, end in events:
        s = end - start
        kind = next(k for k, pattern in KINDS if re.search(pattern, name, re.IGNORECASE))
        seconds[kind] += s
        counts[kind] += 1
        entry = names[re.sub(r"[._]\d+$", "", re.sub(r"(_\d+)+$", "", name))[:60]]
        entry[0], entry[1] = entry[0] + 1, entry[1] + s
    ranked = sorted(names.items(), key=lambda kv: -kv[1][1] if by_time else -kv[1][0])[:top]
    return dict(seconds), dict(counts), {name: (c, t) for name, (c, t) in ranked}


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> "file:line function" of the JAX code that emitted it (the innermost stack frame),
    from an optimized HLO module's text (`compiled.as_text()`); each name also in the spelling GPU kernels
    take ('.' -> '_'), so a trace's fusion kernels find their source."""
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    section, frames = None, {}
    for line in hlo_text.splitlines():
        if line in tables:
            section = tables[line]
            continue
        if section is not None:
            m = re.match(r"(\d+) (.*)", line)
            if m:
                section[int(m.group(1))] = m.group(2)
                continue
            section = None
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*\bstack_frame_id=(\d+)", line)
        if m:
            frames[m.group(1)] = int(m.group(2))

    def field(entry: str, key: str) -> int:
        return int(re.search(rf"\b{key}=(\d+)", entry).group(1))

    def where(frame: int) -> str:
        loc = tables["FileLocations"][field(tables["StackFrames"][frame], "file_location_id")]
        path = tables["FileNames"][field(loc, "file_name_id")].strip('"').split("/")[-1]
        function = tables["FunctionNames"][field(loc, "function_name_id")].strip('"')
        return f"{path}:{field(loc, 'line')} {function}"

    sources = {}
    for name, frame in frames.items():
        sources[name] = sources[name.replace(".", "_")] = where(frame)
    return sources


def kernel_sources(events: list[tuple[str, float, float]], hlo_text: str, top: int = 40
                   ) -> dict[str, tuple[int, float]]:
    """The `top` sources of GPU kernel time among a trace's `kernel_events`, largest first: a fusion kernel
    counts for the JAX line that emitted it (`hlo_sources` of `hlo_text`, the optimized HLO `measure` wrote
    beside the trace), a library kernel (cuBLAS, cuDNN, Triton) for its name. -> (count, seconds)."""
    sources = hlo_sources(hlo_text)
    totals = defaultdict(lambda: [0, 0.0])
    for name, start, end in events:
        entry = totals[sources.get(name) or re.sub(r"[._]\d+$", "", re.sub(r"(_\d+)+$", "", name))[:60]]
        entry[0], entry[1] = entry[0] + 1, entry[1] + end - start
    return {key: (c, t) for key, (c, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]}


def packed_mix(length: int, vocab: int, rows: int = 1, seed: int = 0, median: float = 600.0, p95: float = 4000.0,
               prompt: tuple[int, int] = (50, 500)) -> dict[str, np.ndarray]:
    """`rows` rows of `length` tokens packed with examples drawn from a seeded generator: response lengths
    log-normal with `median` and 95th percentile `p95` (sigma = ln(p95 / median) / 1.645), prompt lengths
    uniform in `prompt` (inclusive). Examples go in order, each where it fits, else at the start of the next
    row; one longer than a row is cut to it (as data.max_total_tokens cuts); what a row leaves is padding."""
    gen = np.random.default_rng(seed)
    sigma = np.log(p95 / median) / 1.6448536
    batch = {key: np.zeros((rows, length), np.int32) for key in ("tokens", "positions", "segment_ids")}
    batch["response_mask"] = np.zeros((rows, length), bool)
    row, col, seg = 0, 0, 0
    while True:
        p = min(int(gen.integers(prompt[0], prompt[1] + 1)), length - 2)  # >= 2 response tokens: one pair
        n = min(p + max(2, int(round(gen.lognormal(np.log(median), sigma)))), length)
        if col + n > length:
            row, col, seg = row + 1, 0, 0
        if row == rows:
            return batch
        seg += 1
        cols = slice(col, col + n)
        batch["tokens"][row, cols] = gen.integers(0, min(1000, vocab), n)
        batch["positions"][row, cols] = np.arange(n)
        batch["segment_ids"][row, cols] = seg
        batch["response_mask"][row, col + p:col + n] = True
        col += n


def rows_of(data: str, length: int, args, vocab: int) -> dict[str, jax.Array]:
    """The batch of one benchmark row: one example of --prompt + response tokens, or the packed mix."""
    if data == "one_example":
        return make_batch(args.prompt, length - args.prompt, vocab)
    return jax.tree.map(jnp.asarray, packed_mix(length, vocab, seed=args.seed, median=args.median, p95=args.p95,
                                                prompt=tuple(args.prompt_range)))


def layout_mtp(mtp: MTPConfig, data: str) -> MTPConfig:
    """The one place the attention layout is chosen per data kind: --prefix_split as given; packed rows
    (several examples a row) also set mtp.packed, as data.packing does in the training CLI (the split's
    per-example parts, `split_attention.packed_split_attention`)."""
    return mtp if data == "one_example" else dataclasses.replace(mtp, packed=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["configs/models/qwen3-8b.json"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768], help="regular tokens a row")
    ap.add_argument("--data", nargs="+", default=["one_example"], choices=DATA)
    ap.add_argument("--prompt", type=int, default=512, help="one_example: prompt tokens")
    ap.add_argument("--median", type=float, default=600.0, help="packed_mix: median response tokens")
    ap.add_argument("--p95", type=float, default=4000.0, help="packed_mix: 95th percentile of response tokens")
    ap.add_argument("--prompt_range", type=int, nargs=2, default=[50, 500], help="packed_mix: prompt tokens")
    ap.add_argument("--seed", type=int, default=0, help="packed_mix: the generator's seed")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--tail_chunk", type=int, default=0,
                    help="MTPConfig.tail_chunk: anchors past the last full chunk in chunks of this size")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (MTP-GLoRA's 8B setting)")
    ap.add_argument("--lora_fuse", action="store_true",
                    help="LoRAConfig.fuse: one adapter for q|k|v and one for gate|up (the 8B configs' layout)")
    ap.add_argument("--lora_dropout", type=float, default=0.0, help="LoRAConfig.dropout (the 8B configs': 0.05)")
    ap.add_argument("--impl", default="cudnn", choices=["cudnn", "xla"])
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    ap.add_argument("--prefix_split", action="store_true",
                    help="MTPConfig.prefix_split on one_example rows: the prefix attention without a mask")
    ap.add_argument("--dq_kernel", default="auto", choices=["auto", "cudnn", "triton"],
                    help="MTPConfig.dq_kernel: the split's backward for the keys before each chunk")
    ap.add_argument("--layer_loop", action="store_true",
                    help="MTPConfig.scan_layers off: the layers as straight-line code over per-layer weights")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype and the frozen base's")
    ap.add_argument("--trainable_dtype", default="float32", help="LoRA, sampler and AdamW moments (8B configs')")
    ap.add_argument("--baseline_max", type=int, default=8192, help="skip the baseline above this regular length")
    ap.add_argument("--reps", type=int, default=2, help="timed runs after a warm-up (0: time the warm-up)")
    ap.add_argument("--breakdown_max", type=int, default=32768,
                    help="above this regular length, only the whole step (no separately compiled parts)")
    ap.add_argument("--trace_dir", default=None, help="profile one step per row and break kernel time down")
    ap.add_argument("--compile_only", action="store_true",
                    help="lower and compile at the real shapes without making any array: each program's memory "
                         "(XLA's analysis) and compile seconds, to check a setting fits before running it")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (any device): the whole script end to end")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE_ARGS, model=["smoke"])
    return args


def model_config(path: str) -> ModelConfig:
    return ModelConfig.from_hf(SMOKE_MODEL, source="smoke") if path == "smoke" else ModelConfig.from_file(path)


def flat_figures(row: dict, peak: float | None) -> dict:
    """The row's top-level figures from its step measurement and counted FLOPs (SPEC §11)."""
    s, counted = row["step"], row["flops"]
    time_s = s.get("time_s")
    return {"time_s": time_s, "tokens_per_s": counted["tokens"] / time_s if time_s else None,
            "mfu": counted["flops"] / (time_s * peak) if time_s and peak else None,
            "peak_gib": s.get("peak_gib"), "compile_s": s.get("compile_s"),
            "lower_s": s.get("lower_s")}


def measure_model(args, path: str, peak: float | None) -> list[dict]:
    """Every (data, length) row of one model."""
    config, dtype, trainable_dtype = model_config(path), jnp.dtype(args.dtype), jnp.dtype(args.trainable_dtype)
    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=("q", "k", "v", "o", "gate", "up", "down"),
                      fuse=args.lora_fuse, dropout=args.lora_dropout)
    mtp = MTPConfig(draft_length=args.k, chunk_size=args.chunk, tail_chunk=args.tail_chunk, row_chunk=4096,
                    attention_impl=args.impl, soft_ce_impl="auto", remat=args.remat,
                    prefix_split=args.prefix_split, dq_kernel=args.dq_kernel, scan_layers=not args.layer_loop)
    model = MTPModel(config, lora, mtp, dtype, trainable_dtype)
    # the straightforward step keeps remat full: with `dots` its whole interleaved row's matmul outputs stay
    baseline_model = MTPModel(config, lora, dataclasses.replace(mtp, remat="full"), dtype, trainable_dtype)

    def build():
        base = random_base(CausalLM(config, None, dtype, dtype))
        mask_row = jnp.mean(base["model"]["embed_tokens"]["embedding"][:1000].astype(jnp.float32), 0)
        trainable, frozen = split_params(model, init_params(model, base, mask_row, jax.random.key(1)))
        return trainable, training_layout(model, frozen)  # as the CLI passes it: per layer without the scan

    trainable, frozen = jax.eval_shape(build) if args.compile_only else build()
    tx, schedule = make_optimizer(OptimConfig(lr=2e-4, warmup_steps=10), 1000)

    def fresh_state():
        state = lambda: {"step": jnp.int32(0), "rng": jax.random.key(0), "trainable": trainable,  # noqa: E731
                         "opt_state": tx.init(trainable), "skipped": jnp.int32(0)}
        return jax.eval_shape(state) if args.compile_only else state()

    measure = functools.partial(measure_fn, reps=args.reps, compile_only=args.compile_only)

    def baseline_step(state, frozen, tokens, lay):
        loss, grads = jax.value_and_grad(functools.partial(interleaved_loss, baseline_model))(
            state["trainable"], frozen, tokens, lay)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        return loss, {**state, "trainable": jax.tree.map(jnp.add, state["trainable"], updates),
                      "opt_state": opt_state}

    rows = []
    for data in args.data:
        row_model = model.clone(mtp=layout_mtp(mtp, data))

        def step(state, frozen, batch):  # the CLI's step; its loss first for measure()
            state, metrics = train_step(row_model, tx, schedule, state, frozen, jax.tree.map(lambda x: x[None], batch))
            return metrics["loss/total"], state, metrics

        for total in args.lengths:
            batch = rows_of(data, total, args, config.vocab_size)
            counted = step_flops(config, jax.tree.map(np.asarray, batch), args.k)
            row = {"model": path, "regular_tokens": total, "data": data, "flops": counted,
                   "examples": int(np.max(np.asarray(batch["segment_ids"]))),
                   "prefix_split": row_model.mtp.prefix_split,
                   "step": measure(step, fresh_state(), frozen, batch, trace_dir=args.trace_dir)}
            row.update(flat_figures(row, peak))
            if total <= args.breakdown_max:
                row["loss_and_grads"] = measure(lambda t, f, b: loss_and_grads(row_model, t, f, b)[:2], trainable,
                                                frozen, batch)
                row["regular_stream"] = measure(lambda t, f, b: (
                    jnp.float32(0), regular_stream(row_model, {**f, **training_layout(row_model, t)}, b)),
                    trainable, frozen, batch)
                if row["time_s"] and row["loss_and_grads"].get("time_s") and row["regular_stream"].get("time_s"):
                    row["breakdown_s"] = {
                        "regular stream (fwd)": row["regular_stream"]["time_s"],
                        "mask stream (fwd+bwd)": row["loss_and_grads"]["time_s"] - row["regular_stream"]["time_s"],
                        "optimizer": row["time_s"] - row["loss_and_grads"]["time_s"]}
            if row["time_s"] and args.trace_dir:  # measure() traced one run of the step
                events = kernel_events(args.trace_dir)
                row["kernels_s"], _, top = kernel_stats(events, top=40, by_time=True)
                row["top_kernels"] = {name: [c, round(t, 4)] for name, (c, t) in top.items()}  # [count, seconds]
                sources = kernel_sources(events, Path(args.trace_dir, OPTIMIZED_HLO).read_text())
                row["top_sources"] = {key: [c, round(t, 4)] for key, (c, t) in sources.items()}
                busy, span = busy_and_span((start, end) for _, start, end in events)
                row["gpu_busy_s"], row["gpu_idle_s"] = busy, span - busy  # idle: between the step's kernels
            if data != "one_example":
                row["baseline"] = {"time_s": None, "error": "one example a row only"}
            elif total > args.baseline_max:
                row["baseline"] = {"time_s": None, "error": "skipped (too large)"}
            else:
                row["baseline"] = measure(baseline_step, fresh_state(), frozen, batch["tokens"],
                                          interleaved_layout(batch, args.k))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_table(env: dict, args, rows: list[dict]) -> None:
    print(f"\n{header(env)}  k={args.k} chunk={args.chunk} "
          f"tail={args.tail_chunk} remat={args.remat} {'layer loop' if args.layer_loop else 'scanned layers'} "
          f"LoRA r{args.rank}{' fused' if args.lora_fuse else ''} dropout {args.lora_dropout} "
          f"{args.dtype}, trainables {args.trainable_dtype}"
          f"{'  (compiled only: memory and compile seconds, nothing run)' if args.compile_only else ''}")
    print(f"{'model':>24} {'regular':>8} {'data':>11} | {'step s':>7} {'GiB':>6} {'tok/s':>7} {'MFU':>6} | "
          f"{'baseline s':>10} {'GiB':>6} | speedup  memory | breakdown")
    for r in rows:
        b = r["baseline"]
        sp, mem = ratio(b.get("time_s"), r["time_s"]), ratio(r["peak_gib"], b.get("peak_gib"))
        parts = " ".join(f"{k} {v:.3f}s" for k, v in {"compile": r["compile_s"], "of it lowering": r["lower_s"],
                                                       **r.get("breakdown_s", {}),
                                                       **r.get("kernels_s", {}),
                                                       "GPU idle": r.get("gpu_idle_s")}.items() if v is not None)
        print(f"{r['model'].split('/')[-1]:>24} {r['regular_tokens']:>8} {r['data']:>11} | {fmt(r['time_s'], '7.3f')} "
              f"{fmt(r['peak_gib'], '6.1f')} {fmt(r['tokens_per_s'], '7.0f')} "
              f"{fmt(r['mfu'] and 100 * r['mfu'], '5.1f')}% | {fmt(b.get('time_s'), '10.3f')} "
              f"{fmt(b.get('peak_gib'), '6.1f')} | {sp:>7} {mem:>7} | {parts} {r['step'].get('error', '')}"
              f"{b.get('error', '')}")


def main(argv=None):
    args = parse_args(argv)
    peak = device_peak_flops(jax.devices()[0])
    rows = [row for path in args.model for row in measure_model(args, path, peak)]
    env = environment()
    report = {**env, "k": args.k, "chunk": args.chunk, "tail_chunk": args.tail_chunk, "rank": args.rank,
              "lora_fuse": args.lora_fuse, "lora_dropout": args.lora_dropout,
              "attention": args.impl, "remat": args.remat,
              "prefix_split": args.prefix_split, "dq_kernel": args.dq_kernel, "scan_layers": not args.layer_loop,
              "dtype": args.dtype, "trainable_dtype": args.trainable_dtype, "compile_only": args.compile_only,
              "packed_mix": {"median": args.median, "p95": args.p95, "prompt_range": args.prompt_range,
                             "seed": args.seed},
              "rows": rows}
    print_table(env, args, rows)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
