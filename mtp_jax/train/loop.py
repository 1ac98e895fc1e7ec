"""The training loop: `run(cfg, resume)` reads top to bottom; I/O lives here and in the modules it calls.

Order: checks without compute (`check_inputs`), then the model config, tokenizer and data cache, then
the base weights; the run directory is written only once all of them loaded. Each optimizer step
runs one compiled `train_step` over its micro-batches; metrics come to the host every `log_every`
steps; `Checkpointer` (mtp_jax.checkpoints) restores, saves and sets torn steps aside.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from mtp_jax import cli
from mtp_jax.checkpoints import TOKEN_COUNTS, Checkpointer, committed_steps
from mtp_jax.config import ConfigError, to_dict
from mtp_jax.data import batch_iterator, make_batches, prepare
from mtp_jax.data.readers import DataError, resolve_data_file
from mtp_jax.flops import device_peak_flops, step_flops
from mtp_jax.mtp.attention import check_packed_rows
from mtp_jax.paths import absolute, absolute_if_local
from mtp_jax.sharding import host_to_global, replicated, to_host
from mtp_jax.train.config import RESUME_KEYS, Config, dotted
from mtp_jax.train.metrics import MetricWriter, Source, Window, progress_line
from mtp_jax.train.state import Setup, abstract_state, build, model_config, tokenizer_with_mask, training_mesh
from mtp_jax.train.step import stack_micro_batches, train_step

log = functools.partial(cli.log, "train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # a scheduler's preemption notice: finish the step, save, stop


class RunStopped(RuntimeError):
    """The run stopped part-way on purpose (non-finite streak, a stop signal); the message says why and
    which checkpoint is good."""


def check_inputs(cfg: Config, resume: bool) -> Path:
    """Every bad input that can be seen without compute: data files, model path, positions, run dir, resume
    compatibility.

    Creates the run directory if missing and writes nothing in it (a probe file, removed): a refused
    run leaves an existing run directory as it was.
    """
    for key in ("train_file", "eval_file"):
        path = getattr(cfg.data, key)
        if path is None:
            continue
        try:
            resolve_data_file(path)
        except (DataError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"data.{key}: {e}; point it at a .json/.jsonl/.parquet/.arrow file, a directory of "
                              "parquet/arrow files or builtin:NAME") from None
    positions = model_config(cfg).max_position_embeddings
    longest, k = cfg.data.max_total_tokens, cfg.mtp.draft_length
    if longest - 1 + k >= positions:  # an example's last token sits at position longest - 1, its k masks after it
        raise ConfigError(f"data.max_total_tokens {longest} with mtp.draft_length {k}: the longest example's "
                          f"masks reach position {longest - 1 + k}, beyond the model's max_position_embeddings "
                          f"{positions}; lower data.max_total_tokens to at most {positions - k} or mtp.draft_length")
    run_dir = absolute(cfg.train.save_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.save_dir: {run_dir} is not writable ({e.strerror or e}); "
                          "choose a directory you can write") from None
    saved = run_dir / "config.yaml"
    if resume and saved.is_file():  # with nothing there, --resume starts the run (a requeued job killed early)
        old, new = yaml.safe_load(saved.read_text()), to_dict(cfg)
        if isinstance((old.get("model") or {}).get("path"), str):  # a saved relative path is compared as absolute
            old["model"]["path"] = absolute_if_local(old["model"]["path"])
        diff = [f"{k}: checkpoint {dotted(old, k)!r}, now {dotted(new, k)!r}" for k in RESUME_KEYS
                if dotted(old, k) != dotted(new, k)]
        if diff:
            raise ConfigError(f"--resume: {run_dir} was trained with a different setup; " + "; ".join(diff)
                              + "; resume with the saved config (config.yaml there) or choose a new save_dir")
    elif committed_steps(run_dir):
        raise ConfigError(f"train.save_dir: {run_dir} already holds checkpoints; pass --resume to continue "
                          "or choose a new save_dir")
    return run_dir


class Trainer:
    """One invocation of a run: the compiled step, the data, the checkpointer and the metric writer."""

    def __init__(self, cfg: Config, run_dir: Path, setup: Setup, mesh, rules, tokenizer, train_iter):
        self.cfg, self.run_dir, self.setup, self.mesh, self.rules = cfg, run_dir, setup, mesh, rules
        self.tokenizer, self.train_iter, self.state = tokenizer, train_iter, setup.state
        self.main_process, self.pcount = jax.process_index() == 0, jax.process_count()
        self.ckpt = Checkpointer(run_dir, cfg.train.save_limit, cfg.train.async_checkpointing, self.main_process)
        spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
        self.batch_sh = NamedSharding(mesh, PartitionSpec(None, *spec))  # [micro, rows, length]
        repl = replicated(mesh)
        self.step_fn = jax.jit(functools.partial(train_step, setup.model, setup.tx, setup.schedule),
                               in_shardings=(setup.state_sh, setup.frozen_sh, None), out_shardings=(setup.state_sh, repl),
                               donate_argnums=0)
        self.executables: dict[tuple, Any] = {}  # batch shapes -> the compiled step (training and eval batches)
        self.saved, self.received = None, []  # the newest step this invocation saved; stop signals received

    def compiled(self, batch: dict):
        """The step compiled for `batch`'s shapes, compiled on first use (JAX's persistent compilation
        cache, when configured, serves a shape another process compiled)."""
        key = tuple(v.shape for v in batch.values())
        if key not in self.executables:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                t0 = time.time()
                c = self.step_fn.lower(self.state, self.setup.frozen, batch).compile()
            msg = f"compiled train_step for batch {key[0]} in {time.time() - t0:.1f}s"
            mem = c.memory_analysis() if self.cfg.train.print_memory else None
            if mem is not None:
                msg += (f"; memory: args {mem.argument_size_in_bytes / 2**20:.1f} MiB, temp "
                        f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, out {mem.output_size_in_bytes / 2**20:.1f} MiB, "
                        f"aliased {mem.alias_size_in_bytes / 2**20:.1f} MiB")
            log(msg)
            self.executables[key] = c
        return self.executables[key]

    def resume(self):
        restored = self.ckpt.restore(abstract_state(self.setup), self.train_iter)
        if restored is not None:
            self.state = restored

    def write_run_files(self, token_counts: np.ndarray):
        """config.yaml, tokenizer/ and the training responses' `token_counts` (a decoder's drafting vocabulary)."""
        if self.main_process:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
            tmp = self.run_dir / f".{TOKEN_COUNTS}.{os.getpid()}.npy"
            np.save(tmp, token_counts)
            os.replace(tmp, self.run_dir / TOKEN_COUNTS)

    def step(self, opt_step: int, window: Window):
        """One optimizer step over `grad_accum` micro-batches from the training data."""
        position = self.train_iter.get_state()  # where the step's data lies in the data order, for error messages
        hosts = [next(self.train_iter) for _ in range(self.cfg.optim.grad_accum)]
        for host in hosts:
            check_packed_rows(host["segment_ids"], self.setup.model.attention)
        counted = [step_flops(self.setup.model.config, h, self.cfg.mtp.draft_length) for h in hosts]
        batch = host_to_global(stack_micro_batches(hosts), self.batch_sh)
        self.state, metrics = self.compiled(batch)(self.state, self.setup.frozen, batch)
        window.add(metrics, Source(f"step {opt_step}", position, hosts[0]["tokens"][0, :24].copy()),
                   sum(c["tokens"] for c in counted) * self.pcount, sum(c["flops"] for c in counted) * self.pcount)

    def evaluate(self, opt_step: int, writer: MetricWriter):
        """Per-step loss / top-1 agreement / acceptance on the held-out file at the current params, logged.

        Runs the compiled train step on a copy of the state and drops the update: the metrics are
        taken before the update, and reusing the executable avoids a second compile of the model.
        """
        cfg = self.cfg
        if cfg.data.eval_file is None:
            return None
        it = batch_iterator(cfg.data, self.tokenizer, cfg.mtp.draft_length, split="eval",
                            process_index=jax.process_index(), process_count=self.pcount)
        rows = []
        for i, host in enumerate(it):
            if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                break
            check_packed_rows(host["segment_ids"], self.setup.model.attention)
            batch = host_to_global(stack_micro_batches([host]), self.batch_sh)
            scratch = jax.tree.map(lambda x: x.copy(), self.state)
            rows.append(to_host(self.compiled(batch)(scratch, self.setup.frozen, batch)[1]))
        weights = np.asarray([float(m["pairs"]) for m in rows])
        if not rows or weights.sum() == 0:
            return None
        keys = [key for key in rows[0] if key.startswith(("loss/", "acc/")) or key == "accept_len"]
        result = {key: float(np.average([m[key] for m in rows], weights=weights)) for key in keys}
        self.ckpt.guard("writing metrics", opt_step, writer.write, opt_step, result, "eval/")
        log(f"eval @ {opt_step}: " + json.dumps({k: round(v, 4) for k, v in result.items()}))
        return result

    def save(self, step: int):
        self.saved = step
        self.ckpt.save(step, self.state, self.train_iter, to_dict(self.cfg))

    def report(self, window: Window, opt_step: int, streak: int, writer: MetricWriter, bar) -> tuple[dict, int]:
        """Fetches the window's metrics, logs its non-finite steps and writes its row; stops the run when
        the non-finite streak reaches train.max_consecutive_nonfinite."""
        limit = self.cfg.train.max_consecutive_nonfinite
        summary, streak = window.summarize(streak, limit, device_peak_flops(jax.devices()[0]))
        for source, m in summary.nonfinite:
            log(f"{source.name}: non-finite loss {m['loss/total']:.4g} or update (grad norm {m['grad_norm']:.4g}); "
                f"update skipped, {int(m['skipped'])} skipped so far")
        self.ckpt.guard("writing metrics", opt_step, writer.write, opt_step, summary.row)
        line = progress_line(summary.row, self.cfg.mtp.draft_length)
        bar.set_postfix_str(line)
        if not self.cfg.train.progress and self.main_process:
            log(f"step {opt_step}: {line}")
        if summary.stop is not None:
            s = summary.stop
            raise RunStopped(f"{s.name}: {limit} non-finite steps in a row (train.max_consecutive_nonfinite = "
                             f"{limit}); the last batch is at data position {s.position}, its first row starts "
                             f"{self.tokenizer.decode(s.head)!r}. Params and optimizer state are as after the last "
                             f"finite update; {self.ckpt.last_good()}. Lower optim.lr, check that data, or raise "
                             "train.max_consecutive_nonfinite")
        return {"step": opt_step, **summary.row}, streak

    def stop_requested(self) -> bool:
        flag = bool(self.received)
        if self.pcount > 1:  # every process stops after the same step, or their collective save would hang
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def on_signal(self, signum, _frame):
        self.received.append(signal.Signals(signum).name)

    def train(self) -> dict:
        """The loop from the restored step to max_steps (or train.stop_after_steps more)."""
        t = self.cfg.train
        start = opt_step = int(to_host(self.state["step"]))
        stop = min(t.max_steps, start + t.stop_after_steps) if t.stop_after_steps else t.max_steps
        writer = MetricWriter(self.run_dir, self.main_process, start)
        bar = tqdm(total=t.max_steps, initial=start, disable=not (t.progress and self.main_process),
                   dynamic_ncols=True, desc="train")
        history, last_eval, window, streak, finished, handlers = [], None, Window(), 0, False, {}
        for sig in STOP_SIGNALS:
            try:
                handlers[sig] = signal.signal(sig, self.on_signal)
            except ValueError:  # not the main thread: the default action stays
                pass
        try:
            while opt_step < stop:
                opt_step += 1
                self.step(opt_step, window)
                bar.update(1)
                self.ckpt.check(opt_step)
                stopping = self.stop_requested()
                if opt_step % t.log_every == 0 or opt_step == stop or stopping:
                    row, streak = self.report(window, opt_step, streak, writer, bar)
                    history.append(row)
                    window = Window()
                if t.eval_every and opt_step % t.eval_every == 0 and opt_step < t.max_steps:
                    last_eval = self.evaluate(opt_step, writer)
                    window.start = time.time()
                if t.save_steps and opt_step % t.save_steps == 0 and opt_step < stop:
                    self.save(opt_step)
                if stopping:
                    if self.saved != opt_step:
                        self.save(opt_step)
                    self.ckpt.wait(opt_step)
                    raise RunStopped(f"stopped by {', '.join(sorted(set(self.received))) or 'another process'} after "
                                     f"optimizer step {opt_step}, saved as {self.ckpt.step_dir(opt_step)}; rerun the "
                                     "same command with --resume to continue")
            bar.close()
            if opt_step > start:
                self.save(opt_step)
            self.ckpt.wait(opt_step)
            last_eval = self.evaluate(opt_step, writer)
            finished = True
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            bar.close()
            self.ckpt.close(opt_step, raise_errors=finished)
            writer.close()
        return {"history": history, "eval": last_eval, "run_dir": self.run_dir, "state": self.state}


def run(cfg: Config, resume: bool = False) -> dict:
    """Trains per `cfg`; returns {'history': [metrics per logged step], 'eval': last eval, 'run_dir', 'state'}.

    `resume` restores the newest committed checkpoint that restores cleanly (a torn newer one is set
    aside and the user told); without a committed checkpoint (killed before the first save) it starts
    from step 0.
    """
    run_dir = check_inputs(cfg, resume)
    if cfg.distributed.initialize or cfg.distributed.coordinator_address:
        jax.distributed.initialize(cfg.distributed.coordinator_address, cfg.distributed.num_processes,
                                   cfg.distributed.process_id)
    mesh, rules = training_mesh(cfg)
    config = model_config(cfg)
    tokenizer, text_vocab = tokenizer_with_mask(cfg, config)
    k = cfg.mtp.draft_length
    one_span = cfg.mtp.prefix_split
    cache = prepare(cfg.data, tokenizer, k, split="train", one_span=one_span)
    train_iter = iter(make_batches(cache, cfg.data, process_index=jax.process_index(),
                                   process_count=jax.process_count()))
    if cfg.data.eval_file is not None:
        # a bad eval file fails now, not after training
        prepare(cfg.data, tokenizer, k, split="eval", one_span=one_span)
    trainer = Trainer(cfg, run_dir, build(cfg, config, mesh, rules, text_vocab), mesh, rules, tokenizer, train_iter)
    if resume:
        trainer.resume()
    trainer.write_run_files(cache.token_counts())
    return trainer.train()
