"""benchmarks/math_prompts.py: seeded, distinct math problems, none a held-out prompt."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from math_prompts import math_prompts  # noqa: E402


def test_problems_are_seeded_distinct_and_not_held_out():
    first = math_prompts(400, seed=5, heldout=[])
    assert first == math_prompts(400, seed=5, heldout=[]) != math_prompts(400, seed=6, heldout=[])
    assert len(set(first)) == 400
    assert any("x" in p and "Solve" in p for p in first) and any("$" in p for p in first)
    # a problem that is a held-out prompt is dropped, the rest kept in order
    again = math_prompts(400, seed=5, heldout=[first[3].lower()])
    assert first[3] not in again and again[:3] == first[:3] and again[3:399] == first[4:]


def test_cli_writes_records(tmp_path):
    out = tmp_path / "math.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "math_prompts.py"), "--out", str(out), "--limit", "30"],
                   check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"math-{i:05d}" for i in range(30)]
    assert {r["category"] for r in records} == {"math"}
    heldout = {json.loads(line)["input"] for line in
               (ROOT / "mtp_jax" / "data" / "prompts" / "heldout_prompts.jsonl").read_text().splitlines()}
    assert not {r["input"] for r in records} & heldout
