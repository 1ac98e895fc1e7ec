"""Every benchmark script imports: most run only on a GPU, so a moved or renamed library name they use would
otherwise surface only in a device lease."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_benchmark_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their siblings (_report, mtp_step, ..)
    module = importlib.import_module(name)
    assert name.startswith("_") or hasattr(module, "main"), f"benchmarks/{name}.py has no main()"
    sys.modules.pop(name, None)
