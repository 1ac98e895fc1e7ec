"""Every benchmark script imports: most run only on a GPU, so a moved or renamed library name they use would
otherwise surface only in a device lease. One child process imports them all, so that this test's modules
(named as the scripts: `decode`, `serve`, ..) never replace the ones other tests imported."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

CHILD = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        if not name.startswith("_") and not hasattr(module, "main"):
            failed.append(f"{name}: no main()")
    except Exception:
        failed.append(f"{name}: {traceback.format_exc(limit=3)}")
print("\\n".join(failed) or "OK")
"""


def test_every_benchmark_imports():
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert len(names) > 10
    proc = subprocess.run([sys.executable, "-c", CHILD, *names], cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout[-4000:] + proc.stderr[-2000:]
