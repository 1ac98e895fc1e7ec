"""Reading a training run back: `load_run(run_dir, step)` for export, decoding and evaluation.

A run directory (written by `mtp_jax.train`) holds config.yaml, tokenizer/ (with `<mask>`),
token_counts.npy (how often each token id occurs in the training responses; `TOKEN_COUNTS`) and
checkpoints/<step>/ (orbax; item `state` = {step, trainable, opt_state, rng, skipped}). The frozen
base model is not in the checkpoint: it is read again from `model.path`, and the `<mask>` row, when
it was not trained, is recomputed exactly as training computed it (mean of the real rows).

Only committed steps count: orbax writes a step into a temporary directory and renames it when
the save is complete, so an interrupted save never shows up as a step here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from mtp_jax import cli
from mtp_jax.config import ConfigError, from_dict
from mtp_jax.models import ModelConfig, load_model
from mtp_jax.models.loading import SafetensorsReader, resolve_model_dir
from mtp_jax.mtp.mask_token import mask_embedding
from mtp_jax.mtp.model import MTPModel
from mtp_jax.mtp.objective import stored_layout
from mtp_jax.paths import absolute
from mtp_jax.sharding import to_host
from mtp_jax.train.config import Config

log = functools.partial(cli.log, "train")


TOKEN_COUNTS = "token_counts.npy"


class CheckpointError(Exception):
    """A run directory or checkpoint that cannot be read as asked."""


class SaveError(RuntimeError):
    """A save (or a write beside it) that failed or was refused; the message names the last good checkpoint."""


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
    config: Config  # as saved by the run
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
    """The model, params and tokenizer of a run at `step` (default: the latest committed one); the model
    reads the stacked layer layout that checkpoints hold, whatever mtp.scan_layers the run trained with."""
    run_dir = absolute(run_dir)
    cfg = _saved_config(run_dir)
    if cfg.model.random_init:
        raise CheckpointError(f"{run_dir}: trained on a randomly initialised base (model.random_init); "
                              "its adapters only fit those random weights")
    step, trainable = restore_trainable(run_dir, step)
    tok_dir = run_dir / "tokenizer"
    if not tok_dir.is_dir():
        raise CheckpointError(f"{tok_dir}: missing (the run saves its tokenizer with <mask> there)")
    from transformers import AutoTokenizer  # here: importing it imports torch, which the JAX path never needs

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
    model = stored_layout(MTPModel(config, cfg.lora, cfg.mtp, compute, params_dtype))
    params = {"base": base, "lora": trainable["lora"], "sampler": trainable["sampler"], "mask_embedding": row}
    return Run(run_dir, step, cfg, model, params, tokenizer, mask_id, text_vocab)


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the float leaves of `tree` holding a NaN or Inf (checked before every save and after restore)."""
    flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(x.dtype, jnp.inexact)]
    # one jitted program (not an eager op per leaf: on a multi-device CPU mesh those raced orbax's save thread)
    ok = to_host(jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in flat]))
    return [jax.tree_util.keystr(path) for (path, _), good in zip(flat, ok) if not good]


class Checkpointer:
    """A training run's checkpoints/: each step an orbax composite of the train state, the data
    iterator's position and the config. `restore` takes the newest step that restores cleanly and sets
    the torn newer ones aside (they are rewritten from it); `save` refuses a non-finite state. A failure
    to write (disk full, permissions: orbax raises OSError or tensorstore's ValueError, an async save's
    at the next call) raises SaveError naming the last good checkpoint."""

    def __init__(self, run_dir: Path, save_limit: int, async_save: bool, main_process: bool = True):
        self.run_dir = absolute(run_dir)
        self.dir, self.main_process = self.run_dir / "checkpoints", main_process
        self.options = ocp.CheckpointManagerOptions(max_to_keep=save_limit, cleanup_tmp_directories=True,
                                                    enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.dir, options=self.options)

    def step_dir(self, step: int) -> Path:
        return self.dir / str(step)

    def last_good(self) -> str:
        steps = committed_steps(self.run_dir)
        return f"last good checkpoint: step {steps[-1]} ({self.step_dir(steps[-1])})" if steps \
            else "no checkpoint was committed"

    def _restore(self, step: int, abstract_state, data_iter):
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter)))
        bad = nonfinite_leaves(out["state"])
        if bad:
            raise CheckpointError(f"non-finite values in {', '.join(bad[:3])}")
        return out["state"]

    def restore(self, abstract_state, data_iter):
        """The state of the newest committed step that restores cleanly (`data_iter` set to its position),
        or None where no step was committed (a new run, or one stopped before its first save)."""
        steps = committed_steps(self.run_dir)
        if not steps:
            log(f"--resume: {self.dir} holds no committed checkpoint (a new run, or one stopped before its first "
                 "save): starting at step 0")
            return None
        failed = []
        for step in reversed(steps):  # newest first; a torn step is never restored
            try:
                state = self._restore(step, abstract_state, data_iter)
            except Exception as e:  # orbax/tensorstore raise many types for missing or garbled files
                if not (is_torn(e) or isinstance(e, CheckpointError)):  # a library failure: move nothing, stop
                    self.manager.close()
                    raise CheckpointError(describe_failure(self.step_dir(step), step, e)) from e
                failed.append(step)
                log(f"checkpoint step {step} ({self.step_dir(step)}) is torn or unreadable: "
                     f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            if failed:
                self._set_aside(failed, step)
            log(f"resumed from {self.step_dir(step)} (optimizer step {step})")
            return state
        self.manager.close()
        raise CheckpointError(f"--resume: none of the committed checkpoints {steps} in {self.dir} restores "
                              "(errors above); if the config changed since they were written, resume with the "
                              "saved config.yaml, else start a new save_dir")

    def _set_aside(self, failed: list[int], step: int):
        """The newer steps are damaged, not the config: moved out so that they are rewritten."""
        self.manager.close()
        moved = [set_aside(self.run_dir, s) for s in failed] if self.main_process else []
        multihost_utils.sync_global_devices("mtp_jax set aside torn checkpoints")
        self.manager = ocp.CheckpointManager(self.dir, options=self.options)
        log(f"resuming from checkpoint step {step} instead of step {failed[0]}, which is torn"
             + (f"; moved to {', '.join(map(str, moved))}" if moved else ""))

    def guard(self, what: str, step: int, fn, *args):
        """fn(*args); an OSError or ValueError (a failed write) becomes SaveError."""
        try:
            return fn(*args)
        except (OSError, ValueError) as e:
            raise SaveError(f"{what} failed at step {step} ({type(e).__name__}: {str(e)[:500]}); {self.last_good()}. "
                            f"Free space or fix permissions under {self.run_dir}, then rerun with --resume") from e

    def save(self, step: int, state, data_iter, config: dict):
        bad = nonfinite_leaves(state)
        if bad:  # train_step never lets one in; refuse rather than write it
            raise SaveError(f"refusing to save step {step}: non-finite values in {', '.join(bad[:3])}; "
                            f"{self.last_good()}")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                                  config=ocp.args.JsonSave(config))
        self.guard(f"saving checkpoint step {step}", step, functools.partial(self.manager.save, step, args=args))

    def check(self, step: int):
        """Raises the error of a finished async save, if any."""
        self.guard("a checkpoint save", step, self.manager.check_for_errors)

    def wait(self, step: int):
        self.guard("a checkpoint save", step, self.manager.wait_until_finished)

    def close(self, step: int, raise_errors: bool = True):
        """Waits for pending saves; with `raise_errors` off (the run is failing already) their errors are
        dropped: the failure that stopped the run is raised again by the pending save."""
        if raise_errors:
            self.guard("a checkpoint save", step, self.manager.close)
            return
        try:
            self.manager.close()
        except Exception:
            pass
