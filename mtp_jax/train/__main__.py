"""Training CLI: `python -m mtp_jax.train --config configs/smollm2_k4.yaml [--resume] [--dotted.key VALUE ...]`.

Wires the pieces: config -> mesh -> frozen base + fresh adapters -> grain batches -> one jitted
`train_step(state, frozen, batch) -> (state, metrics)` -> metrics JSONL / tensorboard / orbax
checkpoints. Without `--config` the embedded default (the defaults = configs/smollm2_k4.yaml) runs.
A run killed at any point continues with the same command plus `--resume` (README: Reliability).
Exit status: 0 done, 2 bad input (refused before training), 1 stopped part-way (`RunStopped`).
SIGTERM or SIGUSR1 (a scheduler's preemption notice, `timeout`) ends the current step, saves it,
and exits with 1: `--resume` continues from that step.
"""

from __future__ import annotations

import sys
from typing import Sequence

from mtp_jax import cli
from mtp_jax.checkpoints import CheckpointError, SaveError
from mtp_jax.config import ConfigError, load_config
from mtp_jax.train.config import Config
from mtp_jax.train.loop import RunStopped, run


def parse_args(argv: Sequence[str]) -> tuple[str | None, bool, list[str]]:
    """(config path, --resume, the dotted overrides)."""
    args = list(argv)
    config_path, resume, rest = None, False, []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if a == "--resume":
            resume = True
        elif a == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config: missing the YAML path (--config configs/NAME.yaml)")
            config_path = args[i + 1]
            i += 1
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return config_path, resume, rest


def _main(argv: list[str]) -> None:
    config_path, resume, overrides = parse_args(argv)
    run(load_config(Config, config_path, overrides), resume)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: done; 2: bad input (config, data, model, checkpoint), refused before training;
    1: the run stopped part-way (RunStopped: non-finite streak, a stop signal; SaveError: a failed save),
    the last good checkpoint named."""
    return cli.run_main(_main, argv, errors=(CheckpointError,), stopped=(RunStopped, SaveError))


if __name__ == "__main__":
    sys.exit(main())
