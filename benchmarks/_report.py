"""What every benchmark report carries: the device, versions, commit and date it ran with, its table
cells, and the files it writes (JSON, Markdown) under one set of helpers."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import jax

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The checkout's short commit ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def cpu_name() -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_name() -> str:
    """jax's first device: its kind on an accelerator, the processor and core count on a CPU."""
    device = jax.devices()[0]
    return device.device_kind if device.platform != "cpu" else cpu_name()


def device_tag(device: str) -> str:
    """A short name for result file names: `h100` for 'NVIDIA H100 80GB HBM3', `cpu` for a CPU."""
    if device.startswith("cpu"):
        return "cpu"
    hit = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", device)
    return (hit.group(1) if hit else re.sub(r"\W+", "_", device)).lower()


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def environment(packages: Sequence[str] = ("jax",), device: str | None = None) -> dict[str, str]:
    """{"device", each package's version, "python", "commit", "date"}: the header of a result, JSON or
    Markdown. `device` defaults to jax's first device."""
    return {"device": device or device_name(), **{p: version(p) for p in packages},
            "python": platform.python_version(), "commit": commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def header(env: dict[str, str]) -> str:
    """One line: `device  jax 0.x  python 3.x  commit abc  date ...`."""
    return "  ".join([env["device"]] + [f"{k} {v}" for k, v in env.items() if k != "device"])


def fmt(x, spec: str) -> str:
    """A table cell: `x` formatted by `spec`, '-' when missing."""
    return f"{x:{spec}}" if x is not None else "-"


def ratio(num, den) -> str:
    """`num / den` as 'N.NNx', '-' when either is missing."""
    return f"{num / den:.2f}x" if num and den else "-"


def text_table(columns: Sequence[tuple[str, str, str]], rows: Sequence[dict]) -> str:
    """A fixed-width table for the terminal. Each column is (title, row key, format spec), the spec
    starting with the width ('8.3f', '>24'; '' for a last free-width column); a missing value is '-'."""
    def width(spec: str) -> int:
        digits = re.match(r"[<>^]?(\d*)", spec).group(1)
        return int(digits) if digits else 0

    lines = [" ".join(f"{title:>{width(spec)}}" for title, _, spec in columns)]
    for row in rows:
        lines.append(" ".join(f"{row[key]:{spec}}" if row.get(key) is not None
                              else f"{'-' if width(spec) else '':>{width(spec)}}" for _, key, spec in columns))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] = ()) -> list[str]:
    """Lines of a Markdown table; column i is right-aligned when right[i] (numbers)."""
    align = ["---:" if r else "---" for r in list(right) + [False] * (len(headers) - len(right))]
    return [f"| {' | '.join(headers)} |", f"|{'|'.join(align)}|"] + \
        [f"| {' | '.join(str(c) for c in row)} |" for row in rows]


def write_json(path: str | os.PathLike | None, report: dict) -> None:
    """`report` as indented JSON at `path` (nothing when path is None), as `write_text` writes."""
    write_text(path, json.dumps(report, indent=1))


def write_text(path: str | os.PathLike | None, text: str) -> None:
    """`text` at `path` (nothing when path is None), e.g. a Markdown report: written beside it and renamed
    over it, so a report rewritten after every phase is never half a file when a run is killed."""
    if path is not None:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
