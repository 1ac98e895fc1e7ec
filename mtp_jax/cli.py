"""What the command-line tools share: one exit path for bad input and one progress log.

A tool's `main(argv)` is `run_main(_main, argv, ...)`: an error of a known kind (bad config, data,
model, tokenizer, or the tool's own) becomes one `error: ...` line on stderr and exit status 2, with
no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import jax

from mtp_jax.config import ConfigError
from mtp_jax.data.readers import DataError
from mtp_jax.models.config import UnsupportedModelError
from mtp_jax.models.loading import ModelLoadError
from mtp_jax.mtp.mask_token import MaskTokenError

# bad input every tool can meet; a tool adds its own kinds (CheckpointError, ExportError, ...) through `errors`
INPUT_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, ModelLoadError, UnsupportedModelError,
                                             MaskTokenError)
BAD_INPUT = 2
STOPPED = 1


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
             errors: tuple[type[Exception], ...] = (), stopped: tuple[type[Exception], ...] = ()) -> int:
    """Exit status of `main(argv)` (argv None: sys.argv[1:]): its return value (None: 0); 2 after an error
    of INPUT_ERRORS or `errors` (refused before any work); 1 after one of `stopped` (the work stopped
    part-way on purpose). Both print `error: <message>` to stderr."""
    try:
        status = main(list(sys.argv[1:] if argv is None else argv))
    except (*INPUT_ERRORS, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except stopped as e:
        print(f"error: {e}", file=sys.stderr)
        return STOPPED
    return status or 0


def log(tool: str, msg: str) -> None:
    """`[tool] msg` on stderr, from the first process only (every process runs the same tool)."""
    if jax.process_index() == 0:
        print(f"[{tool}] {msg}", file=sys.stderr, flush=True)
