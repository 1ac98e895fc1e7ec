"""User paths made absolute once, at the boundary: CLI flags, config load and the public loaders.

Libraries treat relative paths differently from one version to the next (orbax-checkpoint 0.12.8
returns no metadata for a relative checkpoint path), and a run directory outlives the working
directory it was started from, so nothing past the boundary sees a relative path.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN = "builtin:"  # data files shipped inside the package (mtp_jax/data/prompts)


def absolute(path: str | os.PathLike) -> Path:
    """`path` with `~` expanded, made absolute against the working directory (symlinks kept)."""
    return Path(path).expanduser().absolute()


def absolute_file(name: str) -> str:
    """A data file name: `builtin:NAME` unchanged, anything else as an absolute path."""
    return name if name.startswith(BUILTIN) else str(absolute(name))


def absolute_if_local(name: str) -> str:
    """A model reference: an existing local path made absolute; an alias or a hub id unchanged."""
    return str(absolute(name)) if Path(name).expanduser().exists() else name
