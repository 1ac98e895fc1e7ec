"""Block sizes for the soft-CE kernels, and a small on-disk autotune cache.

Both bindings ask `get_config` for a `SoftCEConfig`; on a GPU the first call for
a (device, dtype, vocabulary) key times a few candidates through a
framework-specific `bench` callback and stores the winner in a JSON file
(`$MTP_KERNELS_CACHE_DIR` or `~/.cache/mtp_kernels`), so later runs start fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

_CACHE_FILE = "soft_ce.json"
_VERSION = 2  # bump when the kernels change in a way that invalidates tunings


@dataclasses.dataclass(frozen=True)
class SoftCEConfig:
    block_v: int = 8192      # forward: columns per step of the streaming loop
    num_warps: int = 8
    num_stages: int = 1
    bwd_block_v: int = 4096  # backward: columns per program
    bwd_num_warps: int = 8

    def __post_init__(self):
        for name in ("block_v", "bwd_block_v"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"SoftCEConfig.{name} must be a power of two >= 16, got {v}")

    def fitted(self, vocab: int) -> "SoftCEConfig":
        """Blocks no wider than the (power-of-two rounded) vocabulary."""
        cap = max(16, 1 << max(vocab - 1, 0).bit_length())
        return dataclasses.replace(
            self, block_v=min(self.block_v, cap), bwd_block_v=min(self.bwd_block_v, cap)
        )


DEFAULT = SoftCEConfig()

# (block_v, num_warps, num_stages): a short list, so a first tuning costs ~10 s.
# The forward keeps every thread's strips in registers when
# block_v = 4 strips * 8 columns * 32 threads * num_warps (or a multiple).
FWD_CANDIDATES = [
    dict(block_v=b, num_warps=w, num_stages=s)
    for b, w, s in ((4096, 4, 1), (4096, 4, 3), (8192, 4, 1), (8192, 8, 1),
                    (8192, 8, 3), (16384, 8, 1), (16384, 16, 1))
]
BWD_CANDIDATES = [
    dict(bwd_block_v=b, bwd_num_warps=w) for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8))
]
# Below this vocabulary the kernels are launch-bound: no tuning.
MIN_TUNED_VOCAB = 8192


# Winners of the autotuner on an H100 (benchmarks/results/soft_ce_2026-11-23_h100.md),
# used before tuning, so those keys start fast even with an empty cache.
TUNED = {
    ("NVIDIA H100 80GB HBM3", "bfloat16", 32000): SoftCEConfig(4096, 4, 1, 8192, 8),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 128256): SoftCEConfig(8192, 8, 1, 8192, 8),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 151936): SoftCEConfig(8192, 8, 3, 2048, 8),
}


def cache_path() -> Path:
    root = os.environ.get("MTP_KERNELS_CACHE_DIR") or Path.home() / ".cache" / "mtp_kernels"
    return Path(root) / _CACHE_FILE


def cache_key(device: str, dtype: str, vocab: int) -> str:
    return f"v{_VERSION}|{device}|{dtype}|V={vocab}"


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, cfg: SoftCEConfig) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = _load()
        table[key] = dataclasses.asdict(cfg)
        # Write-then-rename: concurrent processes never see a torn file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-tune next run


_MEMO: dict[str, SoftCEConfig] = {}


def get_config(
    device: str,
    dtype: str,
    vocab: int,
    bench: Callable[[SoftCEConfig, str], float] | None = None,
) -> SoftCEConfig:
    """The tuned config for a key: memo, disk cache, TUNED, then `bench` (if given).

    `bench(cfg, which)` returns milliseconds for `which` in {'fwd', 'bwd'}.
    Autotuning is skipped (defaults used) when bench is None or
    MTP_SOFT_CE_AUTOTUNE=0.
    """
    key = cache_key(device, dtype, vocab)
    if key in _MEMO:
        return _MEMO[key]
    hit = _load().get(key)
    if hit is not None:
        cfg = SoftCEConfig(**hit)
    elif (device, dtype, vocab) in TUNED:
        cfg = TUNED[device, dtype, vocab]
    elif bench is None or vocab < MIN_TUNED_VOCAB or os.environ.get("MTP_SOFT_CE_AUTOTUNE", "1") == "0":
        return DEFAULT.fitted(vocab)
    else:
        cfg = autotune(bench, vocab)
        _store(key, cfg)
    _MEMO[key] = cfg
    return cfg


def autotune(bench: Callable[[SoftCEConfig, str], float], vocab: int) -> SoftCEConfig:
    """Time the forward and the backward candidates separately; keep the fastest of each."""

    def best(which, candidates, base):
        timed, error = [], None
        for kw in candidates:
            cfg = dataclasses.replace(base, **kw).fitted(vocab)
            try:
                timed.append((bench(cfg, which), cfg))
            except Exception as e:  # a candidate that fails to compile (resources) is skipped
                error = e
        if not timed:  # every candidate failed: a real error, not a tuning matter
            raise RuntimeError(f"soft_ce autotune: every {which} candidate failed") from error
        return min(timed, key=lambda p: p[0])[1]

    fwd = best("fwd", FWD_CANDIDATES, DEFAULT)
    bwd = best("bwd", BWD_CANDIDATES, DEFAULT)
    return dataclasses.replace(
        fwd, bwd_block_v=bwd.bwd_block_v, bwd_num_warps=bwd.bwd_num_warps
    ).fitted(vocab)
