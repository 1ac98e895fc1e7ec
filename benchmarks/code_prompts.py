"""Code prompts for self-distillation, made from the documented functions of a Python source tree.

Each public function with a one-line docstring summary becomes "Write a Python function
`name(args)` that does this: <summary>": the shape of the held-out code prompts
(`mtp_jax/data/prompts/heldout_prompts.jsonl`), on thousands of distinct tasks. The answers come
from the base model itself (`python -m mtp_jax.data.distill`), so no other model's text is used.
The default tree is this Python's standard library: present on every machine; `--src` takes several
trees, e.g. the standard library and site-packages (numpy, torch, transformers, ...) for more tasks.

    python benchmarks/code_prompts.py --out /tmp/code_prompts.jsonl --limit 4000
"""

import argparse
import ast
import json
import multiprocessing
import os
import random
import sysconfig
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm


def source_files(src: Path) -> list[Path]:
    """The tree's .py files in a fixed order; tests are no tasks, and the standard library's own
    site-packages is a tree of its own."""
    return [path for path in sorted(src.rglob("*.py"))
            if not any(part in ("test", "tests", "idlelib", "site-packages") for part in path.relative_to(src).parts)]


def documented_functions(path: Path) -> list[tuple[str, str, list[str]]]:
    """(name, one-line docstring summary, arguments) of each public documented function of one file."""
    try:
        tree = ast.parse(path.read_text(errors="replace"))
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = (ast.get_docstring(node) or "").strip().splitlines()
        summary = doc[0].strip() if doc else ""
        if 20 <= len(summary) <= 160 and summary[0].isalpha():
            found.append((node.name, summary, [a.arg for a in node.args.args if a.arg not in ("self", "cls")]))
    return found


def prompts_from(src: Path, seen: set | None = None, workers: int | None = None):
    """Prompts in file order, one per (name, summary) not in `seen` (which grows). Files are parsed by
    `workers` processes (default: every core; parsing a site-packages takes minutes on one)."""
    seen = set() if seen is None else seen
    files = source_files(src)
    with ProcessPoolExecutor(workers or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        for found in tqdm(pool.map(documented_functions, files, chunksize=16), total=len(files), unit="file",
                          desc=f"parse {src}", disable=None):
            for name, summary, args in found:
                if (name, summary) in seen:
                    continue
                seen.add((name, summary))
                yield f"Write a Python function `{name}({', '.join(args)})` that does this: {summary}"


def write_prompts(out: str, category: str, records: list[dict]) -> int:
    """Prompt records `{"id": "<category>-00000", "category", **record}` as JSONL at `out`, written beside it
    and renamed over it (a killed run leaves no half file). Returns how many."""
    tmp = Path(out + ".tmp")
    with open(tmp, "w") as f:
        for i, record in enumerate(records):
            f.write(json.dumps({"id": f"{category}-{i:05d}", "category": category, **record}) + "\n")
    tmp.rename(out)
    return len(records)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--src", nargs="+", default=[sysconfig.get_paths()["stdlib"]])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seen = set()
    prompts = [p for src in args.src for p in prompts_from(Path(src), seen)]
    random.Random(args.seed).shuffle(prompts)
    n = write_prompts(args.out, "code", [{"input": text} for text in prompts[:args.limit]])
    print(f"{args.out}: {n} prompts from {', '.join(args.src)}")


if __name__ == "__main__":
    main()
