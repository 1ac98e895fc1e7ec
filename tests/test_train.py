"""The training CLI: exact resume, bad input caught before compute, sharded runs equal the 1-device run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mtp_jax.config import ConfigError, load_config
from mtp_jax.train import Config, main, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_test.yaml"
COMPILE_CACHE = "/tmp/mtp_jax_test_jax_cache"


def write_data(path: Path, n: int = 24) -> Path:
    pairs = [("What is two plus two?", "Two plus two is four. That is the answer to the question."),
             ("Name a color.", "Blue is a color, and so are red and green and yellow."),
             ("Write hello in Python.", "print('hello') prints the word hello to the screen."),
             ("Count to five.", "One, two, three, four, five. That is counting to five.")]
    with open(path, "w") as f:
        for i in range(n):
            q, a = pairs[i % len(pairs)]
            f.write(json.dumps({"input": f"{q} ({i})", "output": a}) + "\n")
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def tiny(tmp: Path, data: Path, *overrides: str) -> Config:
    return load_config(Config, TINY, ["--data.train_file", str(data), "--data.cache_dir", str(tmp / "cache"),
                                      "--train.save_dir", str(tmp / "run"), *overrides])


def losses(result) -> list[float]:
    return [row["loss/total"] for row in result["history"]]


def test_resume_is_exact(tmp_path, data_file):
    """10 steps straight == 5 steps, stop, --resume, 5 more: same losses and params, bit for bit."""
    straight = run(tiny(tmp_path / "a", data_file, "--train.max_steps", "10"))
    first = run(tiny(tmp_path / "b", data_file, "--train.max_steps", "10", "--train.stop_after_steps", "5"))
    assert (tmp_path / "b" / "run" / "checkpoints" / "5").is_dir(), "no checkpoint at the stop step"
    second = run(tiny(tmp_path / "b", data_file, "--train.max_steps", "10"), resume=True)
    assert losses(first) + losses(second) == losses(straight), "losses differ after resume"
    a = jax.tree.leaves(jax.device_get(straight["state"]["trainable"]))
    b = jax.tree.leaves(jax.device_get(second["state"]["trainable"]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "params differ after resume"
    assert losses(straight)[-1] < losses(straight)[0], "loss did not fall in 10 steps"
    rows = [json.loads(line) for line in open(tmp_path / "a" / "run" / "metrics.jsonl")]
    for key in ("loss/total", "loss/step_1", "acc/step_2", "accept_len", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert key in rows[0], f"metrics.jsonl lacks {key}"
    assert list((tmp_path / "a" / "run" / "tb").iterdir()), "no tensorboard events"
    assert (tmp_path / "a" / "run" / "tokenizer").is_dir(), "tokenizer (with <mask>) not saved in the run dir"

    # resuming as another model or k is refused before any compute
    with pytest.raises(ConfigError, match="draft_length"):
        run(tiny(tmp_path / "b", data_file, "--mtp.draft_length", "3"), resume=True)
    with pytest.raises(ConfigError, match="model.config_overrides"):
        run(tiny(tmp_path / "b", data_file, "--model.config_overrides.num_hidden_layers", "3"), resume=True)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run(tiny(tmp_path / "b", data_file))


def bad(capsys, argv) -> str:
    assert main(argv) == 2, f"{argv} did not fail with exit code 2"
    return capsys.readouterr().err


def test_bad_input_is_a_clear_error(tmp_path, capsys, data_file):
    base = ["--config", str(TINY), "--data.train_file", str(data_file), "--train.save_dir", str(tmp_path / "run")]
    assert "optim.lrr: unknown key (did you mean 'lr'?)" in bad(capsys, base + ["--optim.lrr", "1"])
    assert "train.max_steps: expected an integer" in bad(capsys, base + ["--train.max_steps", "ten"])
    assert "data.train_file" in bad(capsys, base + ["--data.train_file", str(tmp_path / "nope.jsonl")])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "train.save_dir" in bad(capsys, base + ["--train.save_dir", str(blocker / "run")])
    assert "holds no checkpoint" in bad(capsys, base + ["--resume"])
    assert "config file not found" in bad(capsys, ["--config", str(tmp_path / "missing.yaml")])


MESH_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[3])
from mtp_jax.config import load_config
from mtp_jax.train import Config, run
out = {}
for mesh in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    d, f, t = mesh
    cfg = load_config(Config, sys.argv[1], ["--data.train_file", sys.argv[2], "--data.cache_dir", sys.argv[4],
                                            "--train.save_dir", f"{sys.argv[4]}/run_{d}{f}{t}",
                                            "--mesh.data", str(d), "--mesh.fsdp", str(f), "--mesh.tensor", str(t)])
    out["x".join(map(str, mesh))] = [r["loss/total"] for r in run(cfg)["history"]]
print("LOSSES" + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_meshes_match_one_device(tmp_path, data_file):
    """8 CPU devices as 8x1x1, 2x4x1, 2x2x2 (data, fsdp, tensor): the 5-step losses of 1 device within 1e-5."""
    one = losses(run(tiny(tmp_path, data_file)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(TINY), str(data_file), COMPILE_CACHE,
                           str(tmp_path / "mesh")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("LOSSES")[-1])
    for mesh, got in out.items():
        np.testing.assert_allclose(got, one, rtol=0, atol=1e-5, err_msg=f"mesh {mesh} loss differs from 1 device")


DIST_SCRIPT = r"""
import json, sys
import jax
pid, port, tiny, data, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
from mtp_jax.config import load_config
from mtp_jax.train import Config, run
cfg = load_config(Config, tiny, ["--data.train_file", data, "--data.cache_dir", f"{tmp}/cache{pid}",
                                 "--train.save_dir", f"{tmp}/run", "--train.max_steps", "3",
                                 "--distributed.coordinator_address", f"localhost:{port}",
                                 "--distributed.num_processes", "2", "--distributed.process_id", str(pid)])
out = run(cfg)
assert jax.process_count() == 2 and jax.device_count() == 2
print("LOSSES" + json.dumps([r["loss/total"] for r in out["history"]]))
"""


@pytest.mark.slow
def test_two_processes_jax_distributed(tmp_path, data_file):
    """Two CPU processes joined by jax.distributed (localhost coordinator) train 3 steps on a 2-device mesh."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-c", DIST_SCRIPT, str(i), str(port), str(TINY), str(data_file),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = [json.loads(out.split("LOSSES")[-1]) for out, _ in outs]
    assert len(got[0]) == 3 and got[0] == got[1], f"processes disagree: {got}"
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir(), "no checkpoint from the 2-process run"
