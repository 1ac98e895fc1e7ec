"""Training CLI: `python -m mtp_jax.train --config configs/smollm2_k4.yaml [--resume] [--dotted.key VALUE ...]`.

Wires the pieces: config -> mesh -> frozen base + fresh adapters -> grain batches -> one jitted
`train_step(state, frozen, batch) -> (state, metrics)` -> metrics JSONL / tensorboard / orbax
checkpoints. Without `--config` the embedded default (the defaults below = configs/smollm2_k4.yaml) runs.
A run killed at any point continues with the same command plus `--resume` (README: Reliability).
Exit status: 0 done, 2 bad input (refused before training), 1 stopped part-way (`RunStopped`).
SIGTERM or SIGUSR1 (a scheduler's preemption notice, `timeout`) ends the current step, saves it,
and exits with 1: `--resume` continues from that step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from mtp_jax.config import ConfigError, load_config, to_dict
from mtp_jax.data.config import DataConfig
from mtp_jax.models.lora import LoRAConfig
from mtp_jax.mtp.model import MTPConfig
from mtp_jax.paths import absolute, absolute_if_local
from mtp_jax.sharding import MeshConfig


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class ModelSection:
    # HF dir, .gguf or alias; with random_init: a config.json (or a dir holding one) for random weights
    path: str = "smollm2-135m-instruct"
    random_init: bool = False
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # HF config keys (random_init)
    tokenizer: str | None = None  # default: `path` (required with random_init)
    dtype: str = "float32"  # compute dtype
    param_dtype: str | None = None  # default: dtype

    def __post_init__(self):
        object.__setattr__(self, "path", absolute_if_local(self.path))
        if self.tokenizer:
            object.__setattr__(self, "tokenizer", absolute_if_local(self.tokenizer))
        if self.config_overrides and not self.random_init:
            raise ValueError("model.config_overrides needs model.random_init: true (real weights fix the shapes)")
        if self.random_init and not self.tokenizer:
            raise ValueError("model.random_init needs model.tokenizer (a model dir or alias to take the tokenizer from)")
        for name in ("dtype", "param_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name} must be float32|bfloat16|float16, got {v!r}")


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


# keys that must match when resuming: a checkpoint of one model / k cannot continue as another
# (grad_accum too: the step counter counts micro-steps, and accumulation adds a state entry)
RESUME_KEYS = ("model.path", "model.random_init", "model.config_overrides", "mtp.draft_length", "lora.rank",
               "lora.targets", "lora.fuse", "lora.bias", "mtp.train_mask_embedding", "optim.grad_accum")


def _dotted(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


# ----------------------------------------------------------------------------- the step (pure)

def loss_fn(model, trainable, frozen, batch, rng):
    """(loss, grads wrt trainable, metrics) of one batch; metrics carry loss/step_j, acc/step_j, accept_len."""
    from mtp_jax.mtp.objective import loss_and_grads, metrics_from_sums

    rng = rng if model.lora.dropout > 0 else None
    loss, grads, sums = loss_and_grads(model, trainable, frozen, batch, rng)
    metrics = metrics_from_sums(sums, model.mtp.draft_length)
    metrics["loss/total"] = loss
    metrics["pairs"] = sum(sums[f"step_{j}"]["count"] for j in range(1, model.mtp.draft_length + 1))
    return loss, grads, metrics


def train_step(model, tx, schedule, grad_accum, state, frozen, batch):
    """One micro-step: grads of this micro-batch; on the last micro-step of an optimizer step, the AdamW
    update of the pair-weighted mean over its micro-batches (SPEC §5: sum over all valid pairs / their
    number, so grad_accum=n over n micro-batches is the step of one batch holding them all).

    Non-finite: a micro-batch whose loss or gradient is not finite adds nothing, and an update that
    would make a param non-finite is dropped (params and optimizer state stay as they were); both
    count in `skipped` and set the `nonfinite` metric, so no NaN ever enters the state.
    """
    import jax
    import jax.numpy as jnp
    import optax

    rng = jax.random.fold_in(state["rng"], state["step"])
    loss, grads, metrics = loss_fn(model, state["trainable"], frozen, batch, rng)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"step": state["step"] + 1, "rng": state["rng"]}
    if grad_accum > 1:
        acc = state["accum"]
        weight = jnp.where(finite, metrics["pairs"].astype(jnp.float32), 0.0)
        summed = jax.tree.map(lambda a, g: a + jnp.where(finite, g * weight, 0.0), acc["grads"], grads)
        pairs, count = acc["pairs"] + weight, acc["count"] + finite.astype(jnp.int32)
        last = new_state["step"] % grad_accum == 0
        grads = jax.tree.map(lambda x: x / jnp.maximum(pairs, 1.0), summed)
        apply = last & (count > 0)
        new_state["accum"] = {"grads": jax.tree.map(lambda x: jnp.where(last, jnp.zeros_like(x), x), summed),
                              "pairs": jnp.where(last, 0.0, pairs), "count": jnp.where(last, 0, count)}
    else:
        apply = finite
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    overflow = apply & ~all_finite(trainable)
    apply = apply & ~overflow

    def keep(new, old):  # dtypes as they came in (bf16 params: adam's moments would turn fp32 with fp32 grads)
        return jax.tree.map(lambda n, o: jnp.where(apply, n.astype(o.dtype), o), new, old)

    nonfinite = ~finite | overflow
    new_state.update(trainable=keep(trainable, state["trainable"]), opt_state=keep(opt_state, state["opt_state"]),
                     skipped=state["skipped"] + nonfinite.astype(jnp.int32))
    metrics.update(grad_norm=grad_norm, lr=schedule(state["step"] // grad_accum), skipped=new_state["skipped"],
                   nonfinite=nonfinite)
    return new_state, metrics


def all_finite(tree):
    """Scalar bool: every float leaf of `tree` is finite."""
    import jax
    import jax.numpy as jnp

    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the float leaves of `tree` holding a NaN or Inf (checked before every save and after restore)."""
    import jax
    import jax.numpy as jnp

    flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(x.dtype, jnp.inexact)]
    # one jitted program (not an eager op per leaf: on a multi-device CPU mesh those raced orbax's save thread)
    ok = to_host(jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in flat]))
    return [jax.tree_util.keystr(path) for (path, _), good in zip(flat, ok) if not good]


def decay_mask(trainable):
    """AdamW decays matrices and LoRA biases, not RMSNorm weights (sampler norm1/norm2) nor the <mask> row."""
    import jax

    def decays(path, _):
        keys = [getattr(k, "key", str(k)) for k in path]
        return not (keys[0] == "mask_embedding" or any("norm" in str(k) for k in keys))

    return jax.tree_util.tree_map_with_path(decays, trainable)


def make_optimizer(cfg: OptimConfig, max_steps: int):
    import optax

    warmup = optax.linear_schedule(0.01 * cfg.lr, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(max_steps - cfg.warmup_steps, 1), alpha=cfg.min_lr_ratio)
    else:
        main = optax.constant_schedule(cfg.lr)
    schedule = optax.join_schedules([warmup, main], [cfg.warmup_steps]) if cfg.warmup_steps else main
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- setup helpers

def check_inputs(cfg: Config, resume: bool) -> Path:
    """Every bad input that can be seen without compute: data files, model path, run dir, resume compatibility.

    Creates the run directory if missing and writes nothing in it (a probe file, removed): a refused
    run leaves an existing run directory as it was.
    """
    from mtp_jax.checkpoints import committed_steps
    from mtp_jax.data.readers import DataError, resolve_data_file

    if cfg.lora.a_in_base:
        raise ConfigError("lora.a_in_base is the decoding layout (mtp_jax.decoding.layout.prepare builds it from a "
                          "trained run); training needs it off")
    if cfg.mtp.prefix_split and cfg.data.packing:
        raise ConfigError("mtp.prefix_split: the mask-free prefix attention needs one example per row, and "
                          "data.packing puts several in a row; set data.packing: false (or mtp.prefix_split: false)")
    for key in ("train_file", "eval_file"):
        path = getattr(cfg.data, key)
        if path is None:
            continue
        try:
            resolve_data_file(path)
        except (DataError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"data.{key}: {e}; point it at a .json/.jsonl file or builtin:NAME") from None
    model_config(cfg)
    run_dir = Path(cfg.train.save_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.save_dir: {run_dir} is not writable ({e.strerror or e}); "
                          "choose a directory you can write") from None
    has_ckpt = bool(committed_steps(run_dir))
    saved = run_dir / "config.yaml"
    if resume and saved.is_file():  # with nothing there, --resume starts the run (a requeued job killed early)
        old = yaml.safe_load(saved.read_text())
        if isinstance((old.get("model") or {}).get("path"), str):  # runs saved before paths were made absolute
            old["model"]["path"] = absolute_if_local(old["model"]["path"])
        new = to_dict(cfg)
        diff = [f"{k}: checkpoint {_dotted(old, k)!r}, now {_dotted(new, k)!r}" for k in RESUME_KEYS
                if _dotted(old, k) != _dotted(new, k)]
        if diff:
            raise ConfigError(f"--resume: {run_dir} was trained with a different setup; " + "; ".join(diff)
                              + "; resume with the saved config (config.yaml there) or choose a new save_dir")
    elif has_ckpt:
        raise ConfigError(f"train.save_dir: {run_dir} already holds checkpoints; pass --resume to continue "
                          "or choose a new save_dir")
    return run_dir


def _hf_config_file(path: str) -> Path:
    """config.json named by `path`: the file itself, a directory holding one, or a model alias."""
    from mtp_jax.models import resolve_model_dir

    p = Path(path)
    if p.is_file():
        return p
    try:
        p = resolve_model_dir(path) / "config.json"
    except Exception as e:
        raise ConfigError(f"model.path: {path}: not a config.json, model directory or alias ({e})") from None
    if not p.is_file():
        raise ConfigError(f"model.path: {p} not found (model.random_init: true needs a HF config.json)")
    return p


def model_config(cfg: Config):
    """The base model's ModelConfig from its config.json (with random_init, plus config_overrides): no weights read."""
    from mtp_jax.models import ModelConfig, resolve_model_dir

    m = cfg.model
    if m.random_init:
        p = _hf_config_file(m.path)
        try:
            hf = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.path: {p}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return ModelConfig.from_hf({**hf, **m.config_overrides}, source=str(p))
    return ModelConfig.from_file(resolve_model_dir(m.path) / "config.json")


def load_base(cfg: Config, config, mesh, rules):
    """Base params placed by the logical rules: random for model.random_init, else read from model.path."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from mtp_jax.models import load_model
    from mtp_jax.models.llama import CausalLM
    from mtp_jax.models.loading import abstract_params
    from mtp_jax.sharding import logical_shardings

    m = cfg.model
    if m.random_init:
        lm = CausalLM(config, None, jnp.dtype(m.dtype), jnp.dtype(m.param_dtype or m.dtype))
        shardings = logical_shardings(abstract_params(lm), mesh, rules)
        tokens = jnp.zeros((1, 1), jnp.int32)
        init = jax.jit(lambda r: nn.unbox(lm.init(r, tokens, method=lm.forward_logits)["params"]),
                       out_shardings=shardings)
        return init(jax.random.key(cfg.train.seed + 1000))

    def place(path, leaf):
        names = leaf.names if isinstance(leaf, nn.Partitioned) else ()
        return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))

    return load_model(m.path, m.dtype, m.param_dtype, sharding=place)[1]


def abstract_trainable(model):
    """Boxed abstract {'lora', 'sampler'} trees of `model` (logical axes kept)."""
    import jax
    import jax.numpy as jnp

    from mtp_jax.mtp.objective import init_args

    args = init_args(model, jnp.zeros((model.config.hidden_size,)))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    return {"lora": v["lora"]["base"], "sampler": v["params"]["sampler"]}


def count_params(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


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
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._pb = (event_pb2, summary_pb2)
            self.tb = EventFileWriter(str(run_dir / "tb"))
        except ImportError:
            self.tb = None

    def write(self, step: int, metrics: dict[str, float], prefix: str = ""):
        if not self.enabled:
            return
        row = {"step": step, **{prefix + k: v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            event_pb2, summary_pb2 = self._pb
            values = [summary_pb2.Summary.Value(tag=prefix + k, simple_value=float(v))
                      for k, v in metrics.items() if v is not None]
            self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                              summary=summary_pb2.Summary(value=values)))
            self.tb.flush()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
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


def metrics_by_step(run_dir: str | Path) -> dict[int, dict]:
    """{optimizer step: its training metrics row} from a run's metrics.jsonl (eval rows left out)."""
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss/total" in r]
    if len(steps) != len(set(steps)):
        raise ValueError(f"{run_dir}/metrics.jsonl: steps written twice: {steps}")
    return {r["step"]: r for r in rows if "loss/total" in r}


def to_host(tree):
    """Replicated (or single-process) arrays -> numpy; works where other processes hold devices too."""
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def log(msg: str):
    import jax

    if jax.process_index() == 0:
        print(f"[train] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the loop

class RunStopped(RuntimeError):
    """The run stopped part-way on purpose (non-finite streak, failed save or write); the message says
    why and which checkpoint is good."""


# (step setup, batch shapes) -> compiled train_step: later runs in the same process (tests, sweeps) skip
# tracing and compiling; the key holds every config section the step function depends on
_COMPILED: dict[tuple, Any] = {}


def run(cfg: Config, resume: bool = False) -> dict:
    """Trains per `cfg`; returns {'history': [metrics per logged step], 'eval': last eval, 'run_dir', 'state'}.

    Order: checks without compute, then the model config, tokenizer and data cache, then the base
    weights; the run directory is written only once all of them loaded. `resume` restores the newest
    committed checkpoint that restores cleanly (a torn newer one is set aside and the user told);
    without a committed checkpoint (killed before the first save) it starts from step 0.
    """
    run_dir = check_inputs(cfg, resume)
    if cfg.distributed.initialize or cfg.distributed.coordinator_address:
        import jax

        jax.distributed.initialize(cfg.distributed.coordinator_address, cfg.distributed.num_processes,
                                   cfg.distributed.process_id)
    import flax.linen as nn
    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from mtp_jax.checkpoints import CheckpointError, committed_steps, describe_failure, is_torn, set_aside
    from mtp_jax.data import batch_iterator, prepare
    from mtp_jax.models import load_tokenizer
    from mtp_jax.mtp.mask_token import add_mask_token, mask_embedding
    from mtp_jax.mtp.model import MTPModel
    from mtp_jax.mtp.objective import init_params, layer_loop, trainable_keys
    from mtp_jax.sharding import (axes_across_processes, batch_sharding, host_to_global, logical_shardings, make_mesh,
                                  replicated)

    main_process = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh.logical_rules()
    rows_axis = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % rows_axis:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must divide by mesh data*fsdp ({rows_axis})")
    log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)")
    slow = [a for a in axes_across_processes(mesh.devices) if a != "data"]
    if slow:
        log(f"warning: mesh axes {slow} span processes (hosts): their per-layer all-gathers and reduce-scatters "
            f"go over the inter-host network. Keep fsdp*tensor within one host's devices and let data span hosts "
            f"(e.g. --mesh.fsdp {jax.local_device_count() // mesh.shape['tensor']} --mesh.data -1)")

    config = model_config(cfg)
    tokenizer_path = cfg.model.tokenizer or cfg.model.path
    tokenizer = load_tokenizer(tokenizer_path)
    text_vocab = len(tokenizer)
    if text_vocab > config.vocab_size:
        raise ConfigError(f"model.tokenizer: {tokenizer_path} has {text_vocab} tokens but the model's embedding "
                          f"table has {config.vocab_size} rows; use the base model's own tokenizer")
    add_mask_token(tokenizer, config.vocab_size, cfg.mtp.mask_token)
    pidx, pcount = jax.process_index(), jax.process_count()
    k = cfg.mtp.draft_length
    train_iter = batch_iterator(cfg.data, tokenizer, k, split="train", process_index=pidx, process_count=pcount)
    if cfg.data.eval_file is not None:
        prepare(cfg.data, tokenizer, k, split="eval")  # a bad eval file fails now, not after training
    base = load_base(cfg, config, mesh, rules)

    dtype, param_dtype = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.param_dtype or cfg.model.dtype)
    model = MTPModel(config, cfg.lora, cfg.mtp, dtype, param_dtype)
    repl = replicated(mesh)
    table = base["model"]["embed_tokens"]["embedding"]
    mask_row = jax.jit(lambda t: mask_embedding(t, min(text_vocab, t.shape[0])), out_shardings=repl)(table)

    # shardings: base and adapters by logical rules, the optimizer state like its params, scalars replicated
    abstract = abstract_trainable(model)
    train_sh = logical_shardings(abstract, mesh, rules)
    keys = trainable_keys(model)
    if "mask_embedding" in keys:
        train_sh["mask_embedding"] = repl
    frozen = {"base": base, **({} if "mask_embedding" in keys else {"mask_embedding": mask_row})}
    n_base = count_params(base)
    del base  # with mtp.scan_layers off the step reads the layers per layer: no stacked copy stays
    _, frozen = layer_loop(model, frozen)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)

    def init_trainable(rng, row):
        p = init_params(model, {}, row, rng)
        return {k: p[k] for k in keys}

    tx, schedule = make_optimizer(cfg.optim, cfg.train.max_steps)
    accum = cfg.optim.grad_accum
    abstract_train = jax.eval_shape(init_trainable, jax.random.key(0), mask_row)
    abstract_opt = jax.eval_shape(tx.init, abstract_train)
    opt_sh = __import__("optax").tree_map_params(tx, lambda _, s: s, abstract_opt, train_sh,
                                                 transform_non_params=lambda _: repl)
    state_sh = {"step": repl, "trainable": train_sh, "opt_state": opt_sh, "rng": repl, "skipped": repl}
    if accum > 1:
        state_sh["accum"] = {"grads": train_sh, "pairs": repl, "count": repl}

    def init_state(rng, row):
        trainable = init_trainable(rng, row)
        state = {"step": jnp.int32(0), "trainable": trainable, "opt_state": tx.init(trainable),
                 "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)), "skipped": jnp.int32(0)}
        if accum > 1:
            state["accum"] = {"grads": jax.tree.map(jnp.zeros_like, trainable), "pairs": jnp.float32(0),
                              "count": jnp.int32(0)}
        return state

    state = jax.jit(init_state, out_shardings=state_sh)(jax.random.key(cfg.train.seed), mask_row)
    n_train = count_params(state["trainable"])
    log(f"model {cfg.model.path}: {n_base / 1e6:.1f}M frozen base params, {n_train / 1e6:.2f}M trainable, "
        f"k={cfg.mtp.draft_length}, <mask> row = mean of {min(text_vocab, config.vocab_size)} embedding rows")

    step_fn = jax.jit(functools.partial(train_step, model, tx, schedule, accum),
                      in_shardings=(state_sh, frozen_sh, None), out_shardings=(state_sh, repl), donate_argnums=0)
    plain = to_dict(cfg)
    step_setup = (json.dumps({**{s: plain[s] for s in ("model", "lora", "mtp", "optim", "mesh")},
                              "max_steps": cfg.train.max_steps}, sort_keys=True),
                  tuple(d.id for d in mesh.devices.flat), pcount)
    bsh = batch_sharding(mesh, rules)

    # checkpoints
    ckpt_dir = run_dir / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.save_limit, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=cfg.train.async_checkpointing)

    def open_manager():
        return ocp.CheckpointManager(ckpt_dir.absolute(), options=options)

    def last_good() -> str:
        steps = committed_steps(run_dir)
        return f"last good checkpoint: step {steps[-1]} ({ckpt_dir / str(steps[-1])})" if steps \
            else "no checkpoint was committed"

    manager = open_manager()
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)

    def restore(step: int):
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(train_iter)))
        bad = nonfinite_leaves(out["state"])
        if bad:
            raise CheckpointError(f"non-finite values in {', '.join(bad[:3])}")
        return out["state"]

    steps = committed_steps(run_dir) if resume else []
    if resume and not steps:
        log(f"--resume: {ckpt_dir} holds no committed checkpoint (a new run, or one stopped before its first "
            "save): starting at step 0")
    failed = []
    for step in reversed(steps):  # newest first; a torn step is never restored
        try:
            state = restore(step)
        except Exception as e:  # orbax/tensorstore raise many types for missing or garbled files
            if not (is_torn(e) or isinstance(e, CheckpointError)):  # a library failure: move nothing, stop
                manager.close()
                raise CheckpointError(describe_failure(ckpt_dir / str(step), step, e)) from e
            failed.append(step)
            log(f"checkpoint step {step} ({ckpt_dir / str(step)}) is torn or unreadable: "
                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        if failed:  # the newer steps are damaged, not the config: set them aside so they are rewritten
            manager.close()
            if main_process:
                moved = [set_aside(run_dir, s) for s in failed]
            multihost_utils.sync_global_devices("mtp_jax set aside torn checkpoints")
            manager = open_manager()
            log(f"resuming from checkpoint step {step} instead of step {failed[0]}, which is torn"
                + (f"; moved to {', '.join(map(str, moved))}" if main_process else ""))
        log(f"resumed from {ckpt_dir / str(step)} (optimizer step {step})")
        break
    else:
        if steps:
            manager.close()
            raise CheckpointError(f"--resume: none of the committed checkpoints {steps} in {ckpt_dir} restores "
                                  "(errors above); if the config changed since they were written, resume with the "
                                  "saved config.yaml, else start a new save_dir")

    if main_process:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tokenizer.save_pretrained(run_dir / "tokenizer")

    def checked(what: str, fn, *args):
        """fn(*args); a failure to write (disk full, permissions: orbax raises OSError or tensorstore's
        ValueError, an async save's at the next call) stops the run with the last good checkpoint named."""
        try:
            return fn(*args)
        except (OSError, ValueError) as e:
            raise RunStopped(f"{what} failed at step {opt_step} ({type(e).__name__}: {str(e)[:500]}); {last_good()}. "
                             f"Free space or fix permissions under {run_dir}, then rerun with --resume") from e

    saved = [None]  # the newest step this invocation saved

    def save(step: int):
        saved[0] = step
        bad = nonfinite_leaves(state)
        if bad:  # train_step never lets one in; refuse rather than write it
            raise RunStopped(f"refusing to save step {step}: non-finite values in {', '.join(bad[:3])}; {last_good()}")
        checked(f"saving checkpoint step {step}", lambda: manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter),
            config=ocp.args.JsonSave(to_dict(cfg)))))

    def step_for(batch):
        key = (step_setup, tuple(v.shape for v in batch.values()))
        if key not in _COMPILED:
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                t0 = time.time()
                c = step_fn.lower(state, frozen, batch).compile()
            msg = f"compiled train_step for batch {key[1][0]} in {time.time() - t0:.1f}s"
            mem = c.memory_analysis() if cfg.train.print_memory else None
            if mem is not None:
                msg += (f"; memory: args {mem.argument_size_in_bytes / 2**20:.1f} MiB, temp "
                        f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, out {mem.output_size_in_bytes / 2**20:.1f} MiB, "
                        f"aliased {mem.alias_size_in_bytes / 2**20:.1f} MiB")
            log(msg)
            _COMPILED[key] = c
        return _COMPILED[key]

    def evaluate() -> dict | None:
        """Per-step loss / top-1 agreement / acceptance on the held-out file at the current params.

        Runs the compiled train step on a copy of the state and drops the update: the metrics are
        taken before the update, and reusing the executable avoids a second compile of the model.
        """
        if cfg.data.eval_file is None:
            return None
        it = batch_iterator(cfg.data, tokenizer, k, split="eval", process_index=pidx, process_count=pcount)
        rows = []
        for i, host in enumerate(it):
            if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                break
            batch = host_to_global(host, bsh)
            scratch = jax.tree.map(lambda x: x.copy(), state)
            _, m = step_for(batch)(scratch, frozen, batch)
            rows.append(to_host(m))
        weights = np.asarray([float(m["pairs"]) for m in rows])
        if not rows or weights.sum() == 0:
            return None
        keys = [key for key in rows[0] if key.startswith(("loss/", "acc/")) or key == "accept_len"]
        return {key: float(np.average([m[key] for m in rows], weights=weights)) for key in keys}

    from mtp_jax.flops import device_peak_flops, step_flops

    peak = device_peak_flops(jax.devices()[0])
    start = int(to_host(state["step"])) // accum
    writer = MetricWriter(run_dir, main_process, start)
    history, last_eval, window, sources, tokens, flops = [], None, [], [], 0, 0.0
    streak, max_streak = 0, cfg.train.max_consecutive_nonfinite
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not (cfg.train.progress and main_process),
               dynamic_ncols=True, desc="train")
    t_window = time.time()
    opt_step = start
    stop = min(cfg.train.max_steps, start + cfg.train.stop_after_steps) if cfg.train.stop_after_steps \
        else cfg.train.max_steps
    finished = False
    received = []  # SIGTERM/SIGUSR1: finish this step, save it, stop
    stop_signals = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            stop_signals[sig] = signal.signal(sig, lambda signum, _: received.append(signal.Signals(signum).name))
        except ValueError:  # not the main thread: the default action stays
            pass

    def stop_requested() -> bool:
        flag = bool(received)
        if pcount > 1:  # every process stops after the same step, or their collective save would hang
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    try:
        while opt_step < stop:
            for micro in range(accum):
                position = train_iter.get_state()  # where this batch lies in the data order, for error messages
                host = next(train_iter)
                counted = step_flops(model.config, n_base, host, k)
                tokens += counted["tokens"] * pcount
                flops += counted["flops"] * pcount
                batch = host_to_global(host, bsh)
                state, metrics = step_for(batch)(state, frozen, batch)
                window.append(metrics)
                name = f"step {opt_step + 1}" + (f" (micro-batch {micro + 1}/{accum})" if accum > 1 else "")
                sources.append((name, position, host["tokens"][0, :24].copy()))
            opt_step += 1
            bar.update(1)
            checked("a checkpoint save", manager.check_for_errors)
            stopping = stop_requested()
            if opt_step % cfg.train.log_every == 0 or opt_step == stop or stopping:
                fetched = to_host(window)
                too_many = None
                for m, (name, position, head) in zip(fetched, sources):
                    streak = streak + 1 if m["nonfinite"] else 0
                    if not m["nonfinite"]:
                        continue
                    log(f"{name}: non-finite loss {m['loss/total']:.4g} or update (grad norm {m['grad_norm']:.4g}); "
                        f"update skipped, {int(m['skipped'])} skipped so far")
                    if max_streak and streak >= max_streak and too_many is None:
                        too_many = (f"{name}: {streak} non-finite steps in a row (train.max_consecutive_nonfinite = "
                                    f"{max_streak}); the last batch is at data position {position}, its first row "
                                    f"starts {tokenizer.decode(head)!r}. Params and optimizer state are as after the "
                                    f"last finite update; {last_good()}. Lower optim.lr, check that data, or raise "
                                    "train.max_consecutive_nonfinite")
                good = [m for m in fetched if not m["nonfinite"]] or fetched  # window means over finite steps
                row = {key: float(np.mean([m[key] for m in good])) for key in fetched[0]}
                row["nonfinite"] = float(sum(bool(m["nonfinite"]) for m in fetched))
                row["skipped"] = float(fetched[-1]["skipped"])
                row["lr"] = float(fetched[-1]["lr"])
                row.pop("pairs")
                dt = max(time.time() - t_window, 1e-9)
                row["tokens_per_s"] = tokens / dt
                row["mfu"] = flops / (dt * peak * jax.device_count()) if peak else None
                history.append({"step": opt_step, **row})
                checked("writing metrics", writer.write, opt_step, row)
                accept = " ".join(f"{row[f'acc/step_{j}']:.2f}" for j in range(1, k + 1))
                mfu = f" mfu {row['mfu']:.1%}" if row["mfu"] is not None else ""
                bar.set_postfix_str(f"loss {row['loss/total']:.3f} acc {accept} len {row['accept_len']:.2f} "
                                    f"tok/s {row['tokens_per_s']:.0f}{mfu}")
                if not cfg.train.progress and main_process:
                    log(f"step {opt_step}: loss {row['loss/total']:.4f} acc [{accept}] "
                        f"accept_len {row['accept_len']:.3f} tok/s {row['tokens_per_s']:.0f}{mfu}")
                if too_many:
                    raise RunStopped(too_many)
                window, sources, tokens, flops, t_window = [], [], 0, 0.0, time.time()
            if cfg.train.eval_every and opt_step % cfg.train.eval_every == 0 and opt_step < cfg.train.max_steps:
                last_eval = evaluate()
                if last_eval:
                    checked("writing metrics", writer.write, opt_step, last_eval, "eval/")
                    log(f"eval @ {opt_step}: " + json.dumps({kk: round(v, 4) for kk, v in last_eval.items()}))
                t_window = time.time()
            if cfg.train.save_steps and opt_step % cfg.train.save_steps == 0 and opt_step < stop:
                save(opt_step)
            if stopping:
                if saved[0] != opt_step:
                    save(opt_step)
                checked("a checkpoint save", manager.wait_until_finished)
                raise RunStopped(f"stopped by {', '.join(sorted(set(received))) or 'another process'} after "
                                 f"optimizer step {opt_step}, saved as {ckpt_dir / str(opt_step)}; rerun the same "
                                 "command with --resume to continue")
        bar.close()
        if opt_step > start:
            save(opt_step)
        checked("a checkpoint save", manager.wait_until_finished)
        last_eval = evaluate()
        if last_eval:
            checked("writing metrics", writer.write, opt_step, last_eval, "eval/")
            log(f"eval @ {opt_step}: " + json.dumps({kk: round(v, 4) for kk, v in last_eval.items()}))
        finished = True
    finally:
        for sig, handler in stop_signals.items():
            signal.signal(sig, handler)
        bar.close()
        if finished:
            checked("a checkpoint save", manager.close)
        else:
            try:
                manager.close()
            except Exception:  # the failure that stopped the run, raised again by the pending save
                pass
        writer.close()
    return {"history": history, "eval": last_eval, "run_dir": run_dir, "state": state}


def parse_args(argv: Sequence[str]) -> tuple[str | None, bool, list[str]]:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: done; 2: bad input (config, data, model, checkpoint), refused before training;
    1: the run stopped part-way (RunStopped: non-finite streak, failed save), last good checkpoint named."""
    from mtp_jax.checkpoints import CheckpointError
    from mtp_jax.data.readers import DataError
    from mtp_jax.models.config import UnsupportedModelError
    from mtp_jax.models.loading import ModelLoadError
    from mtp_jax.mtp.mask_token import MaskTokenError

    try:
        config_path, resume, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(Config, config_path, overrides)
        run(cfg, resume)
    except (ConfigError, DataError, ModelLoadError, UnsupportedModelError, CheckpointError, MaskTokenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
