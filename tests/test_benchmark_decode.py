"""benchmarks/decode.py runs end to end (--smoke: tiny shapes on CPU), writes the report issue 24 asks for,
and merges the reports of split runs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"model", "batch", "method", "ms_per_call", "tokens_per_s", "floor_ms"}
METHODS = {"plain", "spec_all", "spec_0"}


def decode(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), *args], check=True, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def test_smoke_run_writes_the_issue_rows_and_merges(tmp_path):
    """A smoke run and the merge of its report with itself: every row has the issue's fields; the merged
    report holds each part's rows, each naming its part, and each part's file; merged again, the parts nest."""
    first, merged = tmp_path / "a.json", tmp_path / "merged.json"
    decode("--smoke", "--only", "qwen3-8b", "--no_exactness", "--no_hf", "--out", str(first), cwd=tmp_path)
    report = json.loads(first.read_text())
    assert {"device", "commit", "rows", "exactness"} <= set(report) and report["complete"]
    assert sorted(r["method"] for r in report["rows"]) == sorted(METHODS)
    for row in report["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["floor_ms"] > 0 and (row["below_noise"] or min(row["ms_per_call"], row["tokens_per_s"]) > 0), row
    assert report["models"]["qwen3-8b"]["layout"] == "merged"  # smoke shapes: a small base
    decode("--merge", str(first), str(first), "--out", str(merged), cwd=tmp_path)
    both = json.loads(merged.read_text())
    assert both["rows"] == [{**r, "part": i} for i in (0, 1) for r in report["rows"]]
    assert [p["file"] for p in both["parts"]] == [str(first)] * 2
    decode("--merge", str(merged), str(first), "--out", str(merged), cwd=tmp_path)  # a merged report merged again
    nested = json.loads(merged.read_text())
    assert [r["part"] for r in nested["rows"]] == [f"0.{i}" for i in (0, 1) for _ in report["rows"]] + [1] * len(
        report["rows"])
    assert [p["file"] for p in nested["parts"][0]["parts"]] == [str(first)] * 2


def test_table_compares_rows_of_one_part():
    """A merged report's table divides each row by the plain row of its own part (run), not another's."""
    spec = importlib.util.spec_from_file_location("decode_benchmark", ROOT / "benchmarks" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = lambda method, ms, part: {"model": "m", "batch": 1, "method": method, "ms_per_call": ms,
                                    "tokens_per_s": 1000 / ms, "floor_ms": 1.0, "part": part}
    lines = bench.table([row("plain", 2.0, 0), row("spec_0", 3.0, 0), row("plain", 4.0, 1), row("spec_0", 5.0, 1)])
    cells = [line.split(" | ") for line in lines.splitlines()[2:]]
    assert [c[7] for c in cells] == ["1.00", "1.50", "1.00", "1.25"], cells
