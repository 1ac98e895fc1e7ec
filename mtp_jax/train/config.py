"""The training run's config: one frozen section per concern, `Config` over them, and every check that
spans sections, run at load (`load_config(Config, path, overrides)`), so a bad combination never
reaches a run. Checks that need the file system or devices run in `loop.check_inputs` and `state`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from mtp_jax.data.config import DataConfig
from mtp_jax.models.lora import LoRAConfig
from mtp_jax.mtp.model import MTPConfig
from mtp_jax.paths import absolute, absolute_if_local
from mtp_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # HF dir, .gguf or alias; with random_init: a config.json (or a dir holding one) for random weights
    path: str = "smollm2-135m-instruct"
    random_init: bool = False
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # HF config keys (random_init)
    tokenizer: str | None = None  # default: `path` (required with random_init)
    dtype: str = "float32"  # compute dtype
    param_dtype: str | None = None  # the frozen base's storage; default: dtype
    # LoRA, sampler head, a trained <mask> row and their AdamW moments; default: param_dtype (one
    # setting for both, as before). float32 over a bf16 base keeps small updates that bf16 rounds away.
    trainable_dtype: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", absolute_if_local(self.path))
        if self.tokenizer:
            object.__setattr__(self, "tokenizer", absolute_if_local(self.tokenizer))
        if self.config_overrides and not self.random_init:
            raise ValueError("model.config_overrides needs model.random_init: true (real weights fix the shapes)")
        if self.random_init and not self.tokenizer:
            raise ValueError("model.random_init needs model.tokenizer (a model dir or alias to take the tokenizer from)")
        for name in ("dtype", "param_dtype", "trainable_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name} must be float32|bfloat16|float16, got {v!r}")

    @property
    def base_dtype(self) -> str:
        """The frozen base's storage dtype."""
        return self.param_dtype or self.dtype

    @property
    def trainables_dtype(self) -> str:
        """The trainables' (and their optimizer moments') dtype."""
        return self.trainable_dtype or self.base_dtype


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    warmup_steps: int = 5  # linear from 0.01 x lr
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    weight_decay: float = 0.01  # not on RMSNorm weights nor the <mask> row
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self):
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_accum < 1 or self.max_grad_norm < 0:
            raise ValueError("optim: need lr > 0, warmup_steps >= 0, grad_accum >= 1, max_grad_norm >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    save_dir: str = "runs/smollm2_k4"  # run directory: config.yaml, tokenizer/, checkpoints/, tb/, metrics.jsonl
    max_steps: int = 60  # optimizer steps
    seed: int = 0
    log_every: int = 5
    eval_every: int = 30  # 0: eval only at the end; eval needs data.eval_file
    eval_batches: int = 4  # 0: the whole eval file
    save_steps: int = 30  # 0: only at the end
    save_limit: int = 2
    stop_after_steps: int = 0  # >0: stop this invocation after that many optimizer steps (resume later)
    async_checkpointing: bool = True
    progress: bool = True
    print_memory: bool = True  # memory_analysis() of each compiled step
    # stop when this many micro-steps in a row had a non-finite loss or update (0: never stop);
    # checked every log_every steps, where metrics come to the host
    max_consecutive_nonfinite: int = 10

    def __post_init__(self):
        object.__setattr__(self, "save_dir", str(absolute(self.save_dir)))
        if self.max_steps < 1 or self.log_every < 1 or self.save_limit < 1 or self.max_consecutive_nonfinite < 0:
            raise ValueError("train: need max_steps >= 1, log_every >= 1, save_limit >= 1, "
                             "max_consecutive_nonfinite >= 0")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    # multi-host: jax.distributed.initialize (on GPU clusters with SLURM/k8s env, `initialize: true` alone)
    initialize: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _default_data() -> DataConfig:
    return DataConfig(max_prompt_tokens=64, max_total_tokens=128, batch_size=1, packing=True,
                      bucket_lengths=(128,), max_tokens_per_row=128)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoRAConfig = dataclasses.field(default_factory=lambda: LoRAConfig(rank=16, alpha=32.0))
    mtp: MTPConfig = dataclasses.field(default_factory=lambda: MTPConfig(draft_length=4, chunk_size=32))
    data: DataConfig = dataclasses.field(default_factory=_default_data)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self):
        # packed rows need the split layout's per-example attention and per-anchor teacher rows; mtp.packed
        # set without data.packing stays exact on one example per row (only slower)
        if self.data.packing and not self.mtp.packed:
            object.__setattr__(self, "mtp", dataclasses.replace(self.mtp, packed=True))


# keys that must match when resuming: a checkpoint of one model / k cannot continue as another
# (grad_accum too: it sets how many examples an optimizer step averages over)
RESUME_KEYS = ("model.path", "model.random_init", "model.config_overrides", "mtp.draft_length", "lora.rank",
               "lora.targets", "lora.fuse", "lora.bias", "mtp.train_mask_embedding", "optim.grad_accum")


def dotted(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
