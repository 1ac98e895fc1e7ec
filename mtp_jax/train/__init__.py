"""Training: `python -m mtp_jax.train --config ...` (`__main__`), `loop.run(cfg)` from Python.

config (sections, `Config`, the checks across them) -> state (mesh, base, sharded train state) ->
step (the pure jitted `train_step`) -> loop (data, compiled steps, metrics, checkpoints).
Only the config types are imported here: `mtp_jax.checkpoints` reads them without importing the loop.
"""

from mtp_jax.train.config import (Config, DistributedConfig, ModelSection, OptimConfig, RESUME_KEYS,
                                  TrainConfig)

__all__ = ["Config", "DistributedConfig", "ModelSection", "OptimConfig", "RESUME_KEYS", "TrainConfig"]
