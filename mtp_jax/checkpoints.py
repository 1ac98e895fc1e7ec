"""Reading a training run back: `load_run(run_dir, step)` for export, decoding and evaluation.

A run directory (written by `mtp_jax.train`) holds config.yaml, tokenizer/ (with `<mask>`) and
checkpoints/<step>/ (orbax; item `state` = {step, trainable, opt_state, rng, skipped}). The frozen
base model is not in the checkpoint: it is read again from `model.path`, and the `<mask>` row, when
it was not trained, is recomputed exactly as training computed it (mean of the real rows).

Only committed steps count: orbax writes a step into a temporary directory and renames it when
the save is complete, so an interrupted save never shows up as a step here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from mtp_jax.paths import absolute


class CheckpointError(Exception):
    """A run directory or checkpoint that cannot be read as asked."""


# What reading a damaged step raises: missing files (OSError) and tensorstore's data-loss and decode
# errors or garbled JSON (ValueError). Anything else is the library failing on files it never judged
# (a TypeError inside orbax, say): such a step is reported as unreadable by this orbax, never as torn,
# and never set aside.
TORN_ERRORS = (OSError, ValueError)


def is_torn(error: BaseException) -> bool:
    return isinstance(error, TORN_ERRORS)


def describe_failure(path: Path, step: int, error: BaseException) -> str:
    """What went wrong reading `path` (committed step `step`), for logs and errors."""
    what = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    if is_torn(error):
        return f"{path}: checkpoint of step {step} is torn or unreadable ({what})"
    return (f"{path}: reading checkpoint of step {step} failed inside orbax-checkpoint {ocp.__version__} ({what}); "
            "its files were not found damaged, so it is left in place; check the installed versions "
            "(pip install -e . pins the tested ones)")


@dataclasses.dataclass
class Run:
    run_dir: Path
    step: int  # optimizer step of the restored checkpoint
    config: Any  # mtp_jax.train.Config, as saved by the run
    model: Any  # MTPModel built from that config
    params: dict  # flat {'base', 'lora', 'sampler', 'mask_embedding'}; base is None with load_base=False
    tokenizer: Any  # with `<mask>` registered
    mask_id: int
    text_vocab: int  # tokens before `<mask>` was added


def committed_steps(run_dir: str | Path) -> list[int]:
    """Steps whose save completed, ascending."""
    ckpt = absolute(run_dir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir()
                  if p.is_dir() and p.name.isdigit() and ocp.utils.is_checkpoint_finalized(p))


def set_aside(run_dir: str | Path, step: int) -> Path:
    """Moves committed step `step`, found torn on resume, out of checkpoints/ into torn_checkpoints/ (kept
    for inspection, never restored); returns its new path. Resuming rewrites the step from the one before."""
    run_dir = absolute(run_dir)
    target = run_dir / "torn_checkpoints" / str(step)
    n = 1
    while target.exists():
        target = run_dir / "torn_checkpoints" / f"{step}.{n}"
        n += 1
    target.parent.mkdir(exist_ok=True)
    os.replace(run_dir / "checkpoints" / str(step), target)
    return target


def _saved_config(run_dir: Path):
    from mtp_jax.config import ConfigError, from_dict
    from mtp_jax.train import Config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a training run directory (no config.yaml); "
                              "pass the save_dir of a `python -m mtp_jax.train` run")
    try:
        return from_dict(Config, yaml.safe_load(path.read_text()))
    except (ConfigError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: unreadable run config ({e}); restore it from the copy each checkpoint "
                              "holds (checkpoints/<step>/config/metadata, JSON)") from None


def restore_trainable(run_dir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, trainable tree as numpy arrays) of a committed checkpoint; the latest by default."""
    run_dir = absolute(run_dir)
    steps = committed_steps(run_dir)
    if not steps:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no committed checkpoint (was the run saved? "
                              "an interrupted first save leaves none); train it (--resume) until it saves")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint for step {step}; pick one of the saved "
                              f"steps: {steps}")
    path = run_dir / "checkpoints" / str(step) / "state"
    try:
        logging.getLogger("absl").setLevel(logging.ERROR)  # item dirs have no step-level metadata file
        meta = ocp.StandardCheckpointer().metadata(path).item_metadata
        if meta is None:  # orbax gives no metadata where it cannot read it: a full restore raises the cause
            return step, jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path)["trainable"])
        tree = {"trainable": meta["trainable"]}
        restore_args = ocp.checkpoint_utils.construct_restore_args(
            jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), restore_args,
                                    is_leaf=lambda x: isinstance(x, ocp.RestoreArgs))
        with ocp.PyTreeCheckpointer() as ckptr:
            state = ckptr.restore(path, args=ocp.args.PyTreeRestore(tree, restore_args=restore_args,
                                                                    partial_restore=True))
    except Exception as e:  # orbax raises many types: is_torn tells damaged files from a library failure
        raise CheckpointError(describe_failure(path, step, e) + f"; pick another of the committed steps: {steps}") \
            from None
    return step, state["trainable"]


def load_run(run_dir: str | Path, step: int | None = None, load_base: bool = True, dtype: str | None = None) -> Run:
    """The model, params and tokenizer of a run at `step` (default: the latest committed one)."""
    import jax.numpy as jnp

    from transformers import AutoTokenizer

    from mtp_jax.models import ModelConfig, load_model
    from mtp_jax.models.loading import SafetensorsReader, resolve_model_dir
    from mtp_jax.mtp.mask_token import mask_embedding
    from mtp_jax.mtp.model import MTPModel

    run_dir = absolute(run_dir)
    cfg = _saved_config(run_dir)
    if cfg.model.random_init:
        raise CheckpointError(f"{run_dir}: trained on a randomly initialised base (model.random_init); "
                              "its adapters only fit those random weights")
    step, trainable = restore_trainable(run_dir, step)
    tok_dir = run_dir / "tokenizer"
    if not tok_dir.is_dir():
        raise CheckpointError(f"{tok_dir}: missing (the run saves its tokenizer with <mask> there)")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    mask_id = tokenizer.convert_tokens_to_ids(cfg.mtp.mask_token)
    if mask_id is None or mask_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{tok_dir}: tokenizer has no {cfg.mtp.mask_token!r} token")
    text_vocab = mask_id  # add_mask_token appends <mask> right after the vocabulary

    compute = jnp.dtype(dtype or cfg.model.dtype)
    params_dtype = jnp.dtype(cfg.model.param_dtype or cfg.model.dtype) if dtype is None else compute
    model_dir = resolve_model_dir(cfg.model.path)
    if load_base:
        _, base, config = load_model(model_dir, str(compute), str(params_dtype))
    else:
        base, config = None, ModelConfig.from_file(model_dir / "config.json")
    if "mask_embedding" in trainable:
        row = jnp.asarray(trainable["mask_embedding"], jnp.float32)
    else:  # as training computed it: the table in the run's param dtype, averaged in float32
        table = SafetensorsReader(model_dir).get("model.embed_tokens.weight")
        train_dtype = jnp.dtype(cfg.model.param_dtype or cfg.model.dtype)
        row = mask_embedding(jnp.asarray(table, train_dtype), min(text_vocab, table.shape[0]))
    model = MTPModel(config, cfg.lora, cfg.mtp, compute, params_dtype)
    params = {"base": base, "lora": trainable["lora"], "sampler": trainable["sampler"], "mask_embedding": row}
    return Run(run_dir, step, cfg, model, params, tokenizer, mask_id, text_vocab)
