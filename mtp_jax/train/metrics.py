"""Training metrics on the host: the window of steps between log lines, metrics.jsonl and tensorboard.

Step metrics stay on the devices until a log step; `Window` then fetches them together, counts the
non-finite steps and averages the rest into one row with stable keys (SPEC: `loss/total`,
`loss/step_j`, `acc/step_j`, `accept_len`, `grad_norm`, `lr`, `tokens_per_s`, `mfu`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from mtp_jax.sharding import to_host


@dataclasses.dataclass
class Source:
    """Where an optimizer step's batch came from, for the message that stops a run on non-finite steps."""
    name: str  # "step N"
    position: dict  # the data iterator's state before the batch
    head: np.ndarray  # the first row's first tokens


@dataclasses.dataclass
class Summary:
    row: dict  # the window's metrics row (means over its finite steps)
    nonfinite: list[tuple[Source, dict]]  # each non-finite step's source and metrics
    stop: Source | None  # the step whose non-finite streak reached the limit


class Window:
    """The optimizer steps since the last log line: their device metrics, batch sources, tokens and FLOPs."""

    def __init__(self):
        self.metrics, self.sources, self.tokens, self.flops, self.start = [], [], 0, 0.0, time.time()

    def add(self, metrics: dict, source: Source, tokens: int, flops: float):
        self.metrics.append(metrics)
        self.sources.append(source)
        self.tokens += tokens
        self.flops += flops

    def summarize(self, streak: int, max_streak: int, peak_flops: float | None) -> tuple[Summary, int]:
        """(the window's summary, the non-finite streak after it); `max_streak` 0: never stop."""
        fetched = to_host(self.metrics)
        bad, stop = [], None
        for m, source in zip(fetched, self.sources):
            streak = streak + 1 if m["nonfinite"] else 0
            if m["nonfinite"]:
                bad.append((source, m))
                if max_streak and streak >= max_streak and stop is None:
                    stop = source
        good = [m for m in fetched if not m["nonfinite"]] or fetched  # means over the finite steps
        row = {key: float(np.mean([m[key] for m in good])) for key in fetched[0]}
        row.update(nonfinite=float(sum(bool(m["nonfinite"]) for m in fetched)), skipped=float(fetched[-1]["skipped"]),
                   lr=float(fetched[-1]["lr"]))
        row.pop("pairs")
        seconds = max(time.time() - self.start, 1e-9)
        row["tokens_per_s"] = self.tokens / seconds
        row["mfu"] = self.flops / (seconds * peak_flops * jax.device_count()) if peak_flops else None
        return Summary(row, bad, stop), streak


def progress_line(row: dict, k: int) -> str:
    accept = " ".join(f"{row[f'acc/step_{j}']:.2f}" for j in range(1, k + 1))
    mfu = f" mfu {row['mfu']:.1%}" if row["mfu"] is not None else ""
    return (f"loss {row['loss/total']:.4f} acc [{accept}] accept_len {row['accept_len']:.3f} "
            f"tok/s {row['tokens_per_s']:.0f}{mfu}")


class MetricWriter:
    """metrics.jsonl + tensorboard event file (written with tensorboard's own event writer, no TF/torch).

    metrics.jsonl is the trajectory of the run as it stands: opening it for a run that starts at
    optimizer step `start` drops the rows of later steps (written by an invocation that was killed
    after its last checkpoint; the resumed run writes them again) and a line torn by a kill, so each
    step has one row. The rewrite goes through a temp file and a rename. Tensorboard keeps both copies.
    """

    def __init__(self, run_dir: Path, enabled: bool, start: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        trim_metrics(run_dir / "metrics.jsonl", start)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tb = EventFileWriter(str(run_dir / "tb"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = ""):
        if not self.enabled:
            return
        row = {"step": step, **{prefix + k: v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        values = [summary_pb2.Summary.Value(tag=prefix + k, simple_value=float(v))
                  for k, v in metrics.items() if v is not None]
        self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def trim_metrics(path: Path, through_step: int) -> None:
    """Keeps the whole rows of steps <= through_step in the JSONL file `path` (atomic rewrite)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # torn by a kill mid-write
        if line.endswith("\n") and isinstance(row, dict) and row.get("step", 0) <= through_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
