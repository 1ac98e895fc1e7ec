"""The kernels package installs as `mtp_kernels` and never shadows the HF `kernels` hub package."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code, cwd):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd).stdout.strip()


def test_no_top_level_kernels_package(tmp_path):
    """Outside the source tree, `kernels` resolves to nothing of ours, `mtp_kernels` to our kernels/."""
    origin = run("import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)", tmp_path)
    assert origin == "None" or "mtp" not in origin, f"a top-level `kernels` comes from us: {origin}"
    ours = run("import mtp_kernels; print(list(mtp_kernels.__path__))", tmp_path)
    assert str(ROOT / "kernels") in ours, ours


def test_source_tree_does_not_shadow_hub_kernels(tmp_path):
    """From the repo root (where the README's `python -m mtp_jax...` commands run, the cwd first on
    sys.path) kernels/ is a namespace directory, so an installed HF `kernels` still wins and
    transformers' probe answers as elsewhere; a regular package there broke every model load
    (`cannot import name 'CUDAProperties' from 'kernels'`) once transformers required `kernels`."""
    probe = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    assert run(probe, ROOT) == run(probe, tmp_path)
    run("import transformers.integrations.hub_kernels", ROOT)  # what AutoModel loading imports


def test_transformers_kernels_probe_unchanged(tmp_path):
    """transformers' is_kernels_available() answers the same with and without our packages imported."""
    probe = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    plain = run(probe, tmp_path)
    ours = run("import mtp_jax, mtp_kernels; " + probe, tmp_path)
    assert plain == ours
    try:
        importlib.metadata.version("kernels")
        hub_installed = True
    except importlib.metadata.PackageNotFoundError:
        hub_installed = False
    if not hub_installed:
        assert plain == "False", "is_kernels_available() sees a `kernels` package nobody installed"
