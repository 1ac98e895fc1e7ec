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


def test_smoke_runs_write_the_issue_rows_and_merge(tmp_path):
    """Two split runs (batches 2 and 3, then 2 again) and their merge: every row has the issue's fields; the
    merged report holds each run's rows, each naming its run (part), and each run's file."""
    first, second, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    common = ["--smoke", "--only", "qwen3-8b", "--no_exactness", "--no_hf"]
    decode(*common, "--batches", "2,3", "--out", str(first), cwd=tmp_path)
    decode(*common, "--batches", "2", "--out", str(second), cwd=tmp_path)
    reports = [json.loads(p.read_text()) for p in (first, second)]
    for report in reports:
        assert {"device", "commit", "rows", "exactness"} <= set(report) and report["complete"]
        for row in report["rows"]:
            assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
            assert row["floor_ms"] > 0 and (row["below_noise"] or min(row["ms_per_call"], row["tokens_per_s"]) > 0), row
        assert report["models"]["qwen3-8b"]["layout"] == "merged"  # smoke shapes: a small base
    measured = sorted((r["batch"], r["method"]) for r in reports[0]["rows"])
    assert measured == sorted((b, m) for b in (2, 3) for m in METHODS), measured
    decode("--merge", str(first), str(second), "--out", str(merged), cwd=tmp_path)
    report = json.loads(merged.read_text())
    assert report["rows"] == [{**r, "part": i} for i, rep in enumerate(reports) for r in rep["rows"]]
    assert [p["file"] for p in report["parts"]] == [str(first), str(second)]


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
