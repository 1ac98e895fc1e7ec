"""benchmarks/train_step.py runs end to end (--smoke: tiny shapes on CPU) and writes the rows issue 25 asks for;
its packed mix is the distribution it says."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import busy_and_span, hlo_sources, kernel_sources, kernel_stats, packed_mix  # noqa: E402

ROW_KEYS = {"model", "regular_tokens", "data", "time_s", "tokens_per_s", "mfu", "peak_gib", "compile_s"}


def _two_ops(x):
    y = jnp.sin(x) * 3.0
    return jnp.sum(y @ x.T, axis=0)


def test_hlo_sources_name_the_line_of_each_instruction():
    """Every instruction of an optimized program maps to the line of this file that emitted it, under its
    HLO name and its kernel spelling: the sine to `_two_ops`' first line, the dot to its second."""
    text = jax.jit(_two_ops).lower(jnp.ones((8, 8))).compile().as_text()
    sources = hlo_sources(text)
    first = _two_ops.__code__.co_firstlineno
    line_of = lambda op: next(sources[n] for n in sources if n.startswith(op))  # noqa: E731
    assert line_of("sin") == f"test_benchmark_train_step.py:{first + 1} _two_ops", sources
    assert line_of("dot") == f"test_benchmark_train_step.py:{first + 2} _two_ops", sources
    dotted = [n for n in sources if "." in n]
    assert dotted and all(sources[n.replace(".", "_")] == sources[n] for n in dotted)


def test_kernel_time_goes_to_its_source_line_or_library_kernel():
    """Trace events (name, start, end) of a fusion kernel spelt as GPU kernels are (`_` for `.`), twice, and of a
    cuBLAS kernel with a numeric suffix: the fusion's time goes to its line of `_two_ops`, the library kernel's to
    its name without the suffix, and by kind to "matmul"."""
    text = jax.jit(_two_ops).lower(jnp.ones((8, 8))).compile().as_text()
    sine = next(n for n in hlo_sources(text) if n.startswith("sin") and "." in n)
    events = [(sine.replace(".", "_"), 0.0, 1.0), (sine.replace(".", "_"), 2.0, 2.5), ("nvjet_sm90_gemm_7", 1.0, 1.25)]
    line = f"test_benchmark_train_step.py:{_two_ops.__code__.co_firstlineno + 1} _two_ops"
    assert kernel_sources(events, text) == {line: (2, 1.5), "nvjet_sm90_gemm": (1, 0.25)}
    seconds, counts, top = kernel_stats(events, by_time=True)
    assert seconds["matmul"] == 0.25 and counts["matmul"] == 1 and list(top)[-1] == "nvjet_sm90_gemm"


def test_busy_and_span_count_overlaps_once_and_gaps_not_at_all():
    """Kernels of two streams overlapping, then a gap: busy time counts the overlap once, the span runs from the
    first start to the last end, and their difference is the gap."""
    busy, span = busy_and_span([(0.0, 2.0), (1.0, 3.0), (1.5, 2.5), (5.0, 6.0), (5.5, 5.6)])
    assert (busy, span) == (4.0, 6.0)
    assert busy_and_span([]) == (0.0, 0.0)


def test_packed_mix_draws_the_stated_lengths():
    """Rows of 16k packed from the seeded mix: response lengths with median 600 and 95th percentile 4000
    (within sampling error over ~1100 examples, less the few cut to the row), prompts in 50-500, each
    example one segment with positions from 0, its response after its prompt; the same seed, the same rows."""
    batch = packed_mix(16384, 1000, rows=128, seed=3)
    responses, prompts = [], []
    for r in range(128):
        seg, mask, pos = batch["segment_ids"][r], batch["response_mask"][r], batch["positions"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(pos[where], np.arange(len(where))), "positions restart at each example"
            m = mask[where]
            p = int(np.argmax(m))
            assert not m[:p].any() and m[p:].all(), "a prompt, then its response"
            prompts.append(p)
            responses.append(int(m.sum()))
    assert len(responses) > 1000
    assert 50 <= min(prompts) and max(prompts) <= 500
    assert 530 < np.median(responses) < 680, np.median(responses)
    assert 3300 < np.percentile(responses, 95) < 4800, np.percentile(responses, 95)
    again = packed_mix(16384, 1000, rows=128, seed=3)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)


def test_smoke_run_writes_the_issue_rows(tmp_path):
    """With the 8B configs' LoRA (fused, dropout), which the report records."""
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--smoke", "--lora_fuse",
                    "--lora_dropout", "0.05", "--out", str(out)],
                   check=True, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert {"device", "commit", "rows"} <= set(report)
    assert report["lora_fuse"] is True and report["lora_dropout"] == 0.05
    assert [r["data"] for r in report["rows"]] == ["one_example", "packed_mix"]
    for row in report["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["time_s"] > 0 and row["tokens_per_s"] > 0 and row["compile_s"] > 0, row
        assert row["tokens_per_s"] == row["flops"]["tokens"] / row["time_s"]
    packed = report["rows"][1]
    assert packed["examples"] >= 2 and not packed["prefix_split"]
