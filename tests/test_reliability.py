"""Reliability (issue 10): kill -9 and resume, torn checkpoints, determinism, non-finite steps, failed saves.

Every training claim is checked against an independent uninterrupted run of the same config (the
`reference` fixture): per-step metrics from metrics.jsonl (one row per step, see MetricWriter) and
the final checkpoint's params, bit for bit on CPU. Killed runs are child processes that SIGKILL
themselves at a chosen point (KILL_SCRIPT); the soak (benchmarks/soak.py) kills at random times.
"""

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cpu_devices_flags
from mtp_jax.checkpoints import CheckpointError, committed_steps, nonfinite_leaves, restore_trainable
from mtp_jax.train.__main__ import main
from mtp_jax.train.loop import RunStopped, run
from test_train import COMPILE_CACHE, TINY, data_file, tiny  # noqa: F401 (data_file: a fixture)

# every run here: 4 steps, a checkpoint every 2 (both kept), async saves
STEPS = 4
RUN = ["--train.max_steps", str(STEPS), "--train.save_steps", "2", "--train.async_checkpointing", "true"]
# metrics that define the trajectory (timing figures excluded)
TRAJECTORY = ("loss/", "acc/", "accept_len", "grad_norm", "lr", "skipped", "nonfinite")
CHILD_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "TOKENIZERS_PARALLELISM": "false"}

# python -c KILL_SCRIPT POINT ARGV...: the training CLI, SIGKILLed by itself at POINT:
#   save:N   right after the async save of step N was started (its files are being written)
#   batch:N  50 ms after the N-th batch was handed to the step (the step is running)
#   cache:N  after N examples went into the data cache being built
KILL_SCRIPT = r"""
import os, signal, sys, threading
point, argv = sys.argv[1], sys.argv[2:]
what, n = point.split(":")
n = int(n)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if what == "save":
    import orbax.checkpoint as ocp
    save = ocp.CheckpointManager.save
    def killing_save(self, step, *a, **k):
        out = save(self, step, *a, **k)
        if step == n:
            die()
        return out
    ocp.CheckpointManager.save = killing_save
elif what == "batch":
    import mtp_jax.sharding as sharding
    put, calls = sharding.host_to_global, [0]
    def killing_put(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            threading.Timer(0.05, die).start()
        return put(*a, **k)
    sharding.host_to_global = killing_put
elif what == "cache":
    import mtp_jax.data.cache as cache
    encode, calls = cache.encode_example, [0]
    def killing_encode(ex):
        calls[0] += 1
        if calls[0] == n:
            die()
        return encode(ex)
    cache.encode_example = killing_encode
from mtp_jax.train.__main__ import main
sys.exit(main(argv))
"""


def cli_args(tmp, data, *extra):
    return ["--config", str(TINY), "--data.train_file", str(data), "--data.cache_dir", str(tmp / "cache"),
            "--train.save_dir", str(tmp / "run"), *RUN, *extra]


class Child:
    """A python child process started now, waited for later (compiles run beside the test process's)."""

    def __init__(self, tmp, args, env=CHILD_ENV):
        tmp.mkdir(parents=True, exist_ok=True)
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err)

    def wait(self):
        rc = self.proc.wait(timeout=600)
        return rc, self.out.read_text(), self.err.read_text()


def start_killed_run(tmp, data, point, resume=False):
    """The CLI in a child that SIGKILLs itself at `point` (see KILL_SCRIPT)."""
    return Child(tmp / f"child_{point.replace(':', '_')}", ["-c", KILL_SCRIPT, point, *cli_args(tmp, data),
                                                            *(["--resume"] if resume else [])])


def killed_run(tmp, data, point, resume=False):
    rc, _, err = start_killed_run(tmp, data, point, resume).wait()
    assert rc == -signal.SIGKILL, f"child not killed at {point} (rc {rc}): {err[-3000:]}"


def trajectory(run_dir):
    """{step: training metrics but timings} from a run's metrics.jsonl (eval rows left out); fails if a step
    has more than one row (MetricWriter keeps one per step across resumes)."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss/total" in r]
    assert len(steps) == len(set(steps)), f"{run_dir}/metrics.jsonl: steps written twice: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(TRAJECTORY)} for r in rows if "loss/total" in r}


def final_params(run_dir, step=None):
    return jax.tree.leaves(restore_trainable(run_dir, step)[1])


def assert_same_run(run_dir, ref, what):
    got = trajectory(run_dir)
    assert list(got) == list(range(1, STEPS + 1)), f"{what}: metrics.jsonl steps {list(got)}"
    for step in got:
        assert got[step] == ref["trajectory"][step], f"{what}: step {step} metrics differ from the uninterrupted run"
    assert committed_steps(run_dir)[-1] == STEPS, f"{what}: no final checkpoint"
    same = [np.array_equal(a, b) for a, b in zip(final_params(run_dir), ref["params"])]
    assert all(same), f"{what}: final params differ from the uninterrupted run"


@pytest.fixture(scope="module")
def children(tmp_path_factory, data_file, reference):
    """Started once the reference run has filled the compile cache, it runs beside the tests that follow
    (on the second core): a run killed during its final save. (The 8-device run gets the machine to itself:
    see cpu_devices_flags.)"""
    killed = tmp_path_factory.mktemp("killed")
    return {"killed": (killed, start_killed_run(killed, data_file, "save:4"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file):
    """The uninterrupted run every other run is compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    run(tiny(tmp, data_file, *RUN))
    run_dir = tmp / "run"
    assert committed_steps(run_dir) == [2, 4]
    return {"run_dir": run_dir, "trajectory": trajectory(run_dir), "params": final_params(run_dir)}


@pytest.mark.usefixtures("children")  # first test: the child runs start right after the reference run
def test_run_dir_holds_config_tokenizer_metrics_and_tensorboard(reference):
    run_dir = reference["run_dir"]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    for key in ("loss/total", "loss/step_1", "acc/step_2", "accept_len", "grad_norm", "lr", "tokens_per_s", "mfu",
                "skipped", "nonfinite"):
        assert key in rows[0], f"metrics.jsonl lacks {key}"
    assert rows[-1]["loss/total"] < rows[0]["loss/total"], "loss did not fall"
    assert list((run_dir / "tb").iterdir()), "no tensorboard events"
    assert (run_dir / "tokenizer").is_dir(), "tokenizer (with <mask>) not saved in the run dir"
    assert (run_dir / "config.yaml").is_file()


# ----------------------------------------------------------------------------- stop, kill -9, torn checkpoints

def test_stop_after_steps_then_resume_is_exact(tmp_path, data_file, reference):
    """train.stop_after_steps 2 ends the invocation at step 2 with a checkpoint; --resume runs the rest."""
    run(tiny(tmp_path, data_file, *RUN, "--train.stop_after_steps", "2"))
    assert committed_steps(tmp_path / "run") == [2], "no checkpoint at the stop step"
    run(tiny(tmp_path, data_file, *RUN), resume=True)
    assert_same_run(tmp_path / "run", reference, "stopped at step 2 and resumed")


def test_sigterm_saves_the_current_step_then_resume_is_exact(tmp_path, data_file, reference, monkeypatch):
    """SIGTERM (a scheduler's preemption notice, `timeout`) during step 3: the step finishes and is saved
    although save_steps is 2, the run stops with exit status 1 naming the step, and --resume gives the
    reference run bit for bit."""
    import mtp_jax.train.loop

    count, calls = mtp_jax.train.loop.step_flops, [0]

    def signalling_count(*a, **k):  # runs on each batch just before its step
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return count(*a, **k)

    monkeypatch.setattr(mtp_jax.train.loop, "step_flops", signalling_count)
    with pytest.raises(RunStopped, match="stopped by SIGTERM after optimizer step 3"):
        run(tiny(tmp_path, data_file, *RUN))
    assert committed_steps(tmp_path / "run") == [2, 3]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the SIGTERM handler was left installed"
    monkeypatch.undo()
    run(tiny(tmp_path, data_file, *RUN), resume=True)
    assert_same_run(tmp_path / "run", reference, "stopped by SIGTERM at step 3 and resumed")


def test_kill_during_async_save_then_resume_is_exact(children, data_file, reference):
    """SIGKILL while the final (step-4) save is being written, then --resume: the reference run, bit for bit."""
    tmp, child = children["killed"]
    rc, _, err = child.wait()
    assert rc == -signal.SIGKILL, f"child not killed during the save (rc {rc}): {err[-3000:]}"
    assert committed_steps(tmp / "run") == [2], "the kill did not interrupt the step-4 save"
    run(tiny(tmp, data_file, *RUN), resume=True)
    assert_same_run(tmp / "run", reference, "killed during the step-4 save")


def test_torn_latest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, data_file, reference, capfd):
    """The newest committed step with truncated data files is never restored: step 2 is, the log names both."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["run_dir"], run_dir)
    torn = [f for f in (run_dir / "checkpoints" / "4").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert torn, "no array data files to tear"
    for f in torn:
        f.write_bytes(f.read_bytes()[:7])
    capfd.readouterr()
    run(tiny(tmp_path, data_file, *RUN), resume=True)
    err = capfd.readouterr().err
    assert "checkpoint step 4" in err and "torn or unreadable" in err, f"no log line on the torn step:\n{err}"
    assert "resuming from checkpoint step 2 instead of step 4" in err, f"no log line naming both steps:\n{err}"
    assert (run_dir / "torn_checkpoints" / "4").is_dir(), "the torn step was not set aside"
    assert_same_run(run_dir, reference, "resumed past a torn checkpoint")


def test_no_restorable_checkpoint_is_an_error_and_nothing_is_moved(tmp_path, data_file, reference):
    """Every committed step torn: --resume refuses (exit 2) rather than start over, and sets nothing aside."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["run_dir"], run_dir)
    for f in (run_dir / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])
    with pytest.raises(CheckpointError, match=r"none of the committed checkpoints \[2, 4\] .* restores"):
        run(tiny(tmp_path, data_file, *RUN), resume=True)
    assert committed_steps(run_dir) == [2, 4] and not (run_dir / "torn_checkpoints").exists()


# ----------------------------------------------------------------------------- determinism

def test_same_config_and_seed_give_the_same_run_on_any_worker_count(tmp_path, data_file, reference):
    """A second run of the reference's config and seed, reading data with 2 grain prefetch threads instead of
    none: the same run, bit for bit."""
    run(tiny(tmp_path, data_file, *RUN, "--data.num_workers", "2"))
    assert_same_run(tmp_path / "run", reference, "second run, 2 data workers")


def test_iterator_state_restores_across_worker_counts(tmp_path, data_file):
    """A data position saved by a 2-worker iterator (read-ahead in flight) resumes a 0-worker one exactly."""
    import dataclasses

    from mtp_jax.data.pipeline import make_batches, prepare
    from mtp_jax.models import load_tokenizer

    cfg = dataclasses.replace(tiny(tmp_path, data_file).data, num_workers=2)
    cache = prepare(cfg, load_tokenizer("smollm2-135m-instruct"), draft_length=2)
    threaded = iter(make_batches(cache, cfg))
    seen = [next(threaded) for _ in range(3)]
    state = threaded.get_state()
    expected = [next(threaded) for _ in range(4)]
    plain = iter(make_batches(cache, dataclasses.replace(cfg, num_workers=0)))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(seen, [next(plain) for _ in range(3)]) for k in a)
    plain = iter(make_batches(cache, dataclasses.replace(cfg, num_workers=0)))
    plain.set_state(state)
    got = [next(plain) for _ in range(4)]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(expected, got) for k in a), \
        "0-worker iterator restored from a 2-worker state yields other batches"


MESH_SCRIPT = r"""
import json, sys
from mtp_jax.config import load_config
from mtp_jax.train import Config
from mtp_jax.train.loop import run
tiny, data, tmp, run_args, meshes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
out = {}
for mesh in meshes:  # DxFxT, "+loop": with mtp.scan_layers off
    d, f, t = mesh.removesuffix("+loop").split("x")
    loop = ["--mtp.scan_layers", "false"] if mesh.endswith("+loop") else []
    cfg = load_config(Config, tiny, ["--data.train_file", data, "--data.cache_dir", f"{tmp}/cache",
                                     "--train.save_dir", f"{tmp}/run_{mesh}", *run_args, *loop,
                                     "--mesh.data", d, "--mesh.fsdp", f, "--mesh.tensor", t])
    out[mesh] = [r["loss/total"] for r in run(cfg)["history"]]
print("LOSSES" + json.dumps(out))
"""


def eight_device_losses(tmp, data, meshes):
    """{mesh: per-step losses} from a child with 8 emulated CPU devices (run alone: see cpu_devices_flags)."""
    env = {**CHILD_ENV, "XLA_FLAGS": cpu_devices_flags(8)}
    rc, out, err = Child(tmp, ["-c", MESH_SCRIPT, str(TINY), str(data), str(tmp), json.dumps(RUN), *meshes], env).wait()
    assert rc == 0, err[-3000:]
    return json.loads(out.split("LOSSES")[-1])


def assert_close_to_one_device(out, reference):
    one = [reference["trajectory"][s]["loss/total"] for s in range(1, STEPS + 1)]
    for mesh, got in out.items():
        np.testing.assert_allclose(got, one, rtol=0, atol=1e-5, err_msg=f"mesh {mesh}: losses differ from 1 device")


def test_eight_devices_match_one_device(tmp_path, data_file, reference):
    """8 emulated CPU devices as a 2x2x2 (data, fsdp, tensor) mesh: the 1-device losses within 1e-5, with the
    layers scanned and as a loop over the per-layer frozen base (sharded as the stacked one was)."""
    assert_close_to_one_device(eight_device_losses(tmp_path, data_file, ["2x2x2", "2x2x2+loop"]), reference)


@pytest.mark.slow
def test_other_eight_device_meshes_match_one_device(tmp_path, data_file, reference):
    assert_close_to_one_device(eight_device_losses(tmp_path, data_file, ["8x1x1", "2x4x1"]), reference)


# ----------------------------------------------------------------------------- non-finite steps

def test_nonfinite_steps_are_skipped_logged_and_stop_the_run(tmp_path, data_file, capfd):
    """lr 1e30: the first update (B 0 -> 1e28) is finite, every later loss is NaN. Each NaN step is skipped,
    counted and logged; the third in a row stops the run naming step and batch; checkpoints stay finite."""
    argv = cli_args(tmp_path, data_file, "--optim.lr", "1e30", "--train.max_consecutive_nonfinite", "3",
                    "--train.max_steps", "6")
    capfd.readouterr()
    assert main(argv) == 1, "the run did not stop with exit status 1"
    err = capfd.readouterr().err
    rows = trajectory(tmp_path / "run")
    bad = [s for s, r in rows.items() if r["nonfinite"]]
    assert bad and bad == list(range(bad[0], bad[0] + 3)) and max(rows) == bad[-1], \
        f"expected 3 non-finite steps ending the run, got {bad} of {list(rows)}"
    assert [rows[s]["skipped"] for s in bad] == [1, 2, 3], "skipped steps not counted"
    for s in bad:
        assert f"step {s}: non-finite loss nan" in err, f"no log line for step {s}:\n{err}"
    assert f"step {bad[-1]}: 3 non-finite steps in a row" in err, err
    assert "data position {'next_index'" in err and "its first row starts" in err, f"batch not named:\n{err}"
    assert "Lower optim.lr" in err
    steps = committed_steps(tmp_path / "run")
    assert steps and max(steps) < bad[-1], f"checkpoints {steps}"
    for step in steps:
        leaves = final_params(tmp_path / "run", step)
        assert all(np.isfinite(x).all() for x in leaves), f"checkpoint {step} holds a non-finite value"


def test_refuses_to_save_a_nonfinite_state():
    """The check before every save: a NaN anywhere in the state is found and named."""
    state = {"trainable": {"lora": jnp.ones((3, 2)), "sampler": jnp.zeros(4)}, "step": jnp.int32(3),
             "opt_state": (jnp.ones(2),)}
    assert nonfinite_leaves(state) == []
    state["trainable"]["sampler"] = state["trainable"]["sampler"].at[2].set(jnp.nan)
    state["opt_state"] = (jnp.asarray([1.0, jnp.inf]),)
    assert nonfinite_leaves(state) == ["['opt_state'][0]", "['trainable']['sampler']"]


# ----------------------------------------------------------------------------- train_step (issue 7 leftovers)

@pytest.fixture(scope="module")
def step_setup():
    """A 1-layer random Llama MTP model (k=2, adapters with nonzero B), its frozen params, two micro-batches and
    the one batch holding both; `step`: train_step with SGD (the update is -lr x the gradient; lr lives in the
    optimizer state), jitted (once per number of micro-batches, the leading axis of its batch)."""
    import flax.linen as nn
    import optax

    from conftest import TINY_LLAMA
    from mtp_jax.models import LoRAConfig, ModelConfig
    from mtp_jax.models.llama import CausalLM
    from mtp_jax.mtp.model import MTPConfig, MTPModel
    from mtp_jax.mtp.objective import init_params
    from mtp_jax.train.step import train_step
    from test_mtp import make_batch

    config = ModelConfig.from_hf({**TINY_LLAMA, "model_type": "llama", "num_hidden_layers": 1})
    lm = CausalLM(config)
    model = MTPModel(config, LoRAConfig(rank=4, alpha=8.0), MTPConfig(draft_length=2, chunk_size=16))
    rng = np.random.default_rng(0)

    def random_like(tree):  # numpy values (a jitted init costs ~10 s of XLA compile): norms 1 + noise, B nonzero
        def leaf(path, x):
            noise = rng.normal(0.0, 0.05, x.shape)
            return jnp.asarray(noise + ("norm" in jax.tree_util.keystr(path)), x.dtype)
        return jax.tree_util.tree_map_with_path(leaf, tree)

    tokens = jnp.zeros((1, 1), jnp.int32)
    base = random_like(jax.eval_shape(lambda: nn.unbox(lm.init(jax.random.key(0), tokens,
                                                               method=lm.forward_logits)["params"])))
    row = jnp.mean(base["model"]["embed_tokens"]["embedding"], axis=0)
    abstract = jax.eval_shape(lambda: init_params(model, base, row, jax.random.key(0)))
    trainable = random_like({"lora": abstract["lora"], "sampler": abstract["sampler"]})
    frozen = {"base": base, "mask_embedding": row}
    micro = [make_batch([(5, 9), (3, 4)], rows=2, length=16, seed=1)[0],
             make_batch([(2, 6), (4, 2)], rows=2, length=16, seed=2)[0]]
    both = {k: jnp.concatenate([micro[0][k], micro[1][k]]) for k in micro[0]}
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)

    step = jax.jit(functools.partial(train_step, model, tx, lambda _: 0.0))

    def fresh_state(trainable, lr=1.0):
        opt_state = tx.init(trainable)
        opt_state.hyperparams["learning_rate"] = jnp.float32(lr)
        return {"step": jnp.int32(0), "trainable": trainable, "opt_state": opt_state,
                "rng": jax.random.key_data(jax.random.key(0)), "skipped": jnp.int32(0)}

    return {"trainable": trainable, "frozen": frozen, "micro": micro, "both": both, "step": step,
            "fresh_state": fresh_state, "stacked": lambda *batches: jax.tree.map(lambda *x: jnp.stack(x), *batches)}


def rel_diff(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_grad_accum_equals_one_batch_holding_both(step_setup):
    """optim.grad_accum=2 over two micro-batches (different numbers of valid pairs) = one step on both, and the
    step's metrics are those of the one batch."""
    from mtp_jax.mtp.layout import pair_valid

    s = step_setup
    pairs = [int(pair_valid(b["segment_ids"], b["response_mask"].astype(bool), 2).sum()) for b in s["micro"]]
    assert pairs[0] != pairs[1], "micro-batches with equal pair counts cannot tell a pair-weighted mean apart"
    # updates far above the params: compared to fp32 rounding
    state, m = s["step"](s["fresh_state"](s["trainable"], lr=1e4), s["frozen"], s["stacked"](*s["micro"]))
    assert int(state["step"]) == 1, "two micro-batches made more than one optimizer step"
    one, m_one = s["step"](s["fresh_state"](s["trainable"], lr=1e4), s["frozen"], s["stacked"](s["both"]))
    for key in ("loss/total", "pairs", "acc/step_1", "accept_len"):
        assert abs(float(m[key]) - float(m_one[key])) <= 1e-5 * max(1.0, abs(float(m_one[key]))), key
    start = jax.tree.leaves(s["trainable"])
    for a, b, p in zip(jax.tree.leaves(state["trainable"]), jax.tree.leaves(one["trainable"]), start):
        assert np.any(b != p), "a leaf did not move"
        assert rel_diff(a - p, b - p) < 1e-5, f"accumulated update differs from the one-batch update: {rel_diff(a - p, b - p)}"


def test_nonfinite_loss_skips_the_step(step_setup):
    s = step_setup
    poisoned = {**s["trainable"], "sampler": jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan),
                                                          s["trainable"]["sampler"])}
    state = s["fresh_state"](poisoned)
    new, m = s["step"](state, s["frozen"], s["stacked"](s["both"]))
    assert not np.isfinite(float(m["loss/total"])) and bool(m["nonfinite"])
    assert int(new["skipped"]) == 1 and int(new["step"]) == 1, "the skipped step was not counted"
    same = jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True), (new["trainable"], new["opt_state"]),
                        (state["trainable"], state["opt_state"]))
    assert all(jax.tree.leaves(same)), "a non-finite step changed params or optimizer state"


def test_update_that_overflows_is_dropped(step_setup):
    """Finite loss and gradient, infinite lr: the update would make params non-finite, so it is dropped."""
    s = step_setup
    state = s["fresh_state"](s["trainable"], lr=jnp.inf)
    new, m = s["step"](state, s["frozen"], s["stacked"](s["both"]))
    assert np.isfinite(float(m["loss/total"])) and np.isfinite(float(m["grad_norm"]))
    assert bool(m["nonfinite"]) and int(new["skipped"]) == 1, "the overflowing update was not counted as skipped"
    same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["trainable"]), jax.tree.leaves(s["trainable"]))]
    assert all(same), "an overflowing update changed params"


# ----------------------------------------------------------------------------- failed saves

def test_failed_save_stops_cleanly_with_the_last_good_checkpoint(tmp_path, data_file, reference, capfd, monkeypatch):
    """Disk full while step 4 is saved: an OSError(ENOSPC) raised by the file write of orbax's JSON item, in
    the async save thread (as root, chmod cannot make a directory unwritable, and no tmpfs can be mounted
    here). The run stops with exit status 1 naming step 2 as the last good checkpoint, which restores to
    the reference's step-2 params; no step 4 is committed."""
    import orbax.checkpoint as ocp

    write = ocp.handlers.JsonCheckpointHandler._save_fn

    async def disk_full(self, item, directory):
        if directory.parent.name.startswith("4."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await write(self, item, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full)
    capfd.readouterr()
    assert main(cli_args(tmp_path, data_file)) == 1
    err = capfd.readouterr().err
    run_dir = tmp_path / "run"
    assert "No space left on device" in err, err
    assert f"last good checkpoint: step 2 ({run_dir / 'checkpoints' / '2'})" in err, err
    assert "rerun with --resume" in err
    assert committed_steps(run_dir) == [2], f"committed steps {committed_steps(run_dir)}"
    same = [np.array_equal(a, b) for a, b in zip(final_params(run_dir, 2), final_params(reference["run_dir"], 2))]
    assert all(same), "the last good checkpoint differs from the reference's step 2"


# ----------------------------------------------------------------------------- slow: more kill points

@pytest.mark.slow
def test_killed_during_cache_build_a_step_and_a_save_then_resumed(tmp_path, data_file, reference):
    """Three kills in a row (data cache build, a running step, the step-4 save), each followed by --resume."""
    killed_run(tmp_path, data_file, "cache:10")
    assert not committed_steps(tmp_path / "run")
    killed_run(tmp_path, data_file, "batch:3", resume=True)
    killed_run(tmp_path, data_file, "save:4", resume=True)
    run(tiny(tmp_path, data_file, *RUN), resume=True)
    assert_same_run(tmp_path / "run", reference, "killed three times")
