"""benchmarks/code_prompts.py: documented public functions of source trees become code tasks."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from code_prompts import prompts_from  # noqa: E402

SOURCE = '''
def area(width, height):
    """Return the area of a rectangle of the given size."""

def _hidden(x):
    """A private helper that is documented all the same."""

def short(x):
    """Too short."""

class Box:
    def volume(self, depth):
        """Compute the volume of the box for a given depth."""
'''


def test_prompts_from_trees(tmp_path):
    for tree in ("a/site-packages", "b"):  # a tree may itself be a site-packages directory
        (tmp_path / tree / "pkg").mkdir(parents=True)
        (tmp_path / tree / "pkg" / "m.py").write_text(SOURCE)
        (tmp_path / tree / "pkg" / "tests").mkdir()
        (tmp_path / tree / "pkg" / "tests" / "t.py").write_text(SOURCE.replace("area", "test_area"))
    (tmp_path / "b" / "site-packages").mkdir()  # nested under a tree: its own tree, skipped here
    (tmp_path / "b" / "site-packages" / "x.py").write_text(SOURCE.replace("area", "nested"))
    seen = set()
    first = list(prompts_from(tmp_path / "a" / "site-packages", seen))
    assert first == ["Write a Python function `area(width, height)` that does this: "
                     "Return the area of a rectangle of the given size.",
                     "Write a Python function `volume(depth)` that does this: "
                     "Compute the volume of the box for a given depth."]
    assert list(prompts_from(tmp_path / "b", seen)) == []  # the same tasks again: deduplicated
