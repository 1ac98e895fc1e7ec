"""Peak memory and time of one MTP loss+grad step at 8B shapes (random init), two-stream vs a
straightforward interleaved baseline (dense mask over the interleaved sequence, XLA softmax CE).

    python benchmarks/mtp_step.py --model configs/models/qwen3-8b.json --lengths 2048 8192 --out results.json

Prints a table with each figure beside the baseline from the same run; an OOM is reported, not
raised. GPU only (an 8B model needs ~16 GB in bf16).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.flops import device_peak_flops, step_flops
from mtp_jax.models import LoRAConfig, ModelConfig
from mtp_jax.models.llama import CausalLM
from mtp_jax.models.loading import abstract_params
from mtp_jax.mtp.model import MTPConfig, MTPModel
from mtp_jax.mtp.objective import init_params, loss_and_grads, split_params, training_layout
from _report import environment, fmt, header, ratio, write_json

OPTIMIZED_HLO = "optimized_hlo.txt"  # measure()'s optimized program, beside its trace


def random_base(model: CausalLM, seed: int = 0):
    """Random base params at the model's real shapes, made on the device in one jitted call."""
    shapes = jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, abstract_params(model),
                          is_leaf=lambda b: hasattr(b, "value"))
    leaves, treedef = jax.tree.flatten(shapes)

    @jax.jit
    def init(key):
        keys = jax.random.split(key, len(leaves))
        return [(0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) for k, x in zip(keys, leaves)]

    return jax.tree.unflatten(treedef, init(jax.random.key(seed)))


def make_batch(prompt: int, response: int, vocab: int):
    length = prompt + response
    rng = np.random.default_rng(0)
    return {"tokens": jnp.asarray(rng.integers(0, min(1000, vocab), (1, length)), jnp.int32),
            "positions": jnp.arange(length, dtype=jnp.int32)[None],
            "segment_ids": jnp.ones((1, length), jnp.int32),
            "response_mask": jnp.asarray((np.arange(length) >= prompt)[None])}


def interleaved_layout(batch, k: int) -> dict:
    """Host-side index arrays of the interleaved sequence (SPEC §2) for one row: prompt, then
    each response token followed by its k masks. Passed to the jitted loss as arguments, so XLA
    builds the [L, L] mask on the device instead of folding it as a compile-time constant."""
    length = batch["tokens"].shape[1]
    prompt = int(np.argmax(np.asarray(batch["response_mask"][0])))
    reg_index = np.concatenate([np.arange(prompt)] + [np.full(k + 1, a) for a in range(prompt, length)])
    step = np.concatenate([np.zeros(prompt, int)] + [np.arange(k + 1) for _ in range(prompt, length)])
    is_mask = step > 0
    mask_rows = np.nonzero(is_mask)[0]
    a, j = reg_index[mask_rows], step[mask_rows]
    return {"reg_index": jnp.asarray(reg_index, jnp.int32), "step": jnp.asarray(step, jnp.int32),
            "reg_rows": jnp.asarray(np.nonzero(~is_mask)[0], jnp.int32), "mask_rows": jnp.asarray(mask_rows, jnp.int32),
            "target": jnp.asarray(np.minimum(a + j, length - 1), jnp.int32), "valid": jnp.asarray(a + j < length)}


def interleaved_loss(model: MTPModel, trainable, frozen, tokens, lay):
    """Baseline: the whole interleaved sequence through the decoder with a dense [L, L] mask
    (cuDNN fused attention where available), then XLA softmax cross-entropy over all rows."""
    p = {**frozen, **training_layout(model, trainable)}  # frozen: in the training layout already
    reg_index, step = lay["reg_index"], lay["step"]
    m = step > 0
    ids = jnp.where(m, 0, tokens[0][reg_index])
    q_reg, k_reg = reg_index[:, None], reg_index[None, :]
    mask = (~m[None, :] & (k_reg <= q_reg)) | (m[:, None] & m[None, :] & (k_reg == q_reg) & (step[None] <= step[:, None]))
    lm = CausalLM(model.config, model.lora, model.dtype, model.param_dtype, model.mtp.remat,
                  scan_layers=model.mtp.scan_layers)
    v = {"params": p["base"], "lora": p["lora"]}
    emb = lm.apply(v, ids[None], method=lm.embed)
    emb = jnp.where(m[None, :, None], p["mask_embedding"].astype(emb.dtype), emb)

    def attend(q, kk, vv, layer_state):
        return jax.nn.dot_product_attention(q, kk, vv, mask=mask[None, None],
                                            implementation=model.attention.impl_for(q, kk)), None

    hidden, _ = lm.apply(v, None, (reg_index + step)[None], attend, gate=m[None].astype(model.dtype), embeddings=emb)
    logits = lm.apply(v, hidden[0], method=lm.logits).astype(jnp.float32)
    teacher = jax.lax.stop_gradient(logits[lay["reg_rows"]])
    t = teacher[lay["target"]]
    ce = -jnp.sum(jax.nn.softmax(t) * jax.nn.log_softmax(logits[lay["mask_rows"]]), -1)
    return jnp.sum(jnp.where(lay["valid"], ce, 0.0)) / jnp.sum(lay["valid"])


def _peak_gib(mem) -> float | None:
    """A compiled program's memory (XLA's analysis: temporaries, arguments, outputs) in GiB."""
    if mem is None:
        return None
    return (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30


def measure(fn, *args, reps=3, trace_dir=None, compile_only=False):
    """Compile once, time `reps` runs after a warm-up (reps 0: time the warm-up itself, for steps of minutes);
    with `trace_dir`, one more run under jax.profiler and the optimized HLO beside it (`OPTIMIZED_HLO`); with
    `compile_only` (args may be abstract), no run.
    `fn` returns the loss first (reported, a sanity check that the step computed something finite)."""
    try:
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        lower_s = time.perf_counter() - t0  # tracing and lowering (Python), the rest is XLA's compile
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        times = {"peak_gib": _peak_gib(mem), "compile_s": compile_s, "lower_s": lower_s}
        if compile_only:
            return {"time_s": None, **times}
        t0 = time.perf_counter()
        loss = float(jax.tree.leaves(jax.block_until_ready(compiled(*args)))[0])
        runs = [time.perf_counter() - t0] if reps == 0 else []  # reps 0: the warm-up run is the timing
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            runs.append(time.perf_counter() - t0)
        if trace_dir:
            with jax.profiler.trace(trace_dir):
                jax.block_until_ready(compiled(*args))
            # the optimized program, whose instruction names are the trace's kernel names (their sources)
            Path(trace_dir, OPTIMIZED_HLO).write_text(compiled.as_text())
        return {"time_s": float(np.median(runs)), **times, "loss": loss}
    except Exception as e:  # XLA reports OOM as a runtime error
        msg = str(e).splitlines()[0][:160]
        return {"time_s": None, "peak_gib": None, "error": ("OOM: " if "memory" in msg.lower() else "") + msg}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="configs/models/qwen3-8b.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--baseline_max", type=int, default=8192, help="skip the baseline above this regular length")
    ap.add_argument("--impl", default="cudnn", choices=["cudnn", "xla"], help="attention (both variants)")
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"], help="per-layer remat (both)")
    ap.add_argument("--prefix_split", action="store_true",
                    help="MTPConfig.prefix_split: the prefix attention without a mask (one example per row)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    config = ModelConfig.from_file(args.model)
    lora = LoRAConfig(rank=16, alpha=32.0)
    mtp = MTPConfig(draft_length=args.k, chunk_size=args.chunk, row_chunk=2048,
                    attention_impl=args.impl, soft_ce_impl="auto", remat=args.remat,
                    prefix_split=args.prefix_split)
    model = MTPModel(config, lora, mtp, jnp.bfloat16, jnp.bfloat16)
    base = random_base(CausalLM(config, None, jnp.bfloat16, jnp.bfloat16))
    mask_row = jnp.mean(base["model"]["embed_tokens"]["embedding"][:1000].astype(jnp.float32), 0)
    params = init_params(model, base, mask_row, jax.random.key(1))
    trainable, frozen = split_params(model, params)
    peak = device_peak_flops(jax.devices()[0])
    rows = []
    for total in args.lengths:
        batch = make_batch(args.prompt, total - args.prompt, config.vocab_size)
        ours = measure(lambda t, f, b: loss_and_grads(model, t, f, b)[:2], trainable, frozen, batch, reps=args.reps)
        naive = jax.value_and_grad(functools.partial(interleaved_loss, model))
        base_r = (measure(naive, trainable, frozen, batch["tokens"], interleaved_layout(batch, args.k), reps=args.reps)
                  if total <= args.baseline_max
                  else {"time_s": None, "peak_gib": None, "error": "skipped (too large)"})
        counted = step_flops(config, jax.tree.map(np.asarray, batch), args.k)
        if ours["time_s"] and peak:  # SPEC §11, attention included
            ours["regular_tokens_per_s"] = counted["tokens"] / ours["time_s"]
            ours["mfu"] = counted["flops"] / (ours["time_s"] * peak)
        rows.append({"regular_tokens": total, "two_stream": ours, "interleaved": base_r, "flops": counted})
        print(json.dumps(rows[-1]), flush=True)
    env = environment()
    report = {**env, "model": args.model, "k": args.k, "chunk": args.chunk,
              "attention": args.impl, "remat": args.remat,
              "prefix_split": args.prefix_split, "rows": rows}
    print(f"\n{header(env)}  {args.model}  k={args.k} chunk={args.chunk}")
    print(f"{'regular':>8} | {'two-stream s':>12} {'GiB':>7} | {'interleaved s':>13} {'GiB':>7} | speedup")
    for r in rows:
        o, b = r["two_stream"], r["interleaved"]
        print(f"{r['regular_tokens']:>8} | {fmt(o['time_s'], '12.3f')} {fmt(o['peak_gib'], '7.1f')} | "
              f"{fmt(b['time_s'], '13.3f')} {fmt(b['peak_gib'], '7.1f')} | {ratio(b['time_s'], o['time_s'])}  "
              f"{'MFU %.1f%%' % (100 * o['mfu']) if o.get('mfu') else ''} {o.get('error', '')}{b.get('error', '')}")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
