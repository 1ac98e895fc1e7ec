"""The training CLI: helpers for tiny runs (used by test_reliability and tests/bad_inputs), two processes via jax.distributed.

Resume, determinism, sharded meshes and failures: tests/test_reliability.py; bad input: tests/bad_inputs/.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mtp_jax.config import ConfigError, load_config
from mtp_jax.train import Config
from mtp_jax.train.loop import check_inputs, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_test.yaml"
COMPILE_CACHE = os.environ.get("MTP_JAX_TEST_COMPILE_CACHE", "/tmp/mtp_jax_test_jax_cache")


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


def test_packed_split_without_the_triton_dq_warns(tmp_path, data_file, capsys):
    """Packed rows on cuDNN's split with cuDNN's backward (no jax-triton) get a warning at model build: that
    backward ran out of memory at 8B shapes. With the Triton dq, or one example a row, no warning."""
    from mtp_jax.models.config import ModelConfig
    from mtp_jax.mtp.attention import resolve_dq_kernel
    from mtp_jax.train.state import build_model

    config = ModelConfig.from_file(ROOT / "configs" / "models" / "smollm2-135m.json")
    for packing, dq_kernel in (("true", "cudnn"), ("false", "cudnn"), ("true", "auto")):
        cfg = tiny(tmp_path, data_file, "--data.packing", packing, "--mtp.prefix_split", "true",
                   "--mtp.attention_impl", "cudnn", "--mtp.dq_kernel", dq_kernel, "--model.dtype", "bfloat16")
        build_model(cfg, config)
        warned = "sequence packing" in capsys.readouterr().err
        expected = packing == "true" and resolve_dq_kernel(dq_kernel, "cudnn") == "cudnn"
        assert warned == expected, (packing, dq_kernel)


DIST_SCRIPT = r"""
import json, sys
import jax
pid, port, tiny, data, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
from mtp_jax.config import ConfigError, load_config
from mtp_jax.train import Config
from mtp_jax.train.loop import run
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


def test_longest_example_and_its_masks_fit_the_positions(tmp_path, data_file):
    """The tiny config's longest example (32 tokens) puts its k = 2 masks at positions up to 33: a model
    with 34 positions takes it, one with 33 is refused before any run file is written."""
    fits = tiny(tmp_path / "fits", data_file, "--model.config_overrides.max_position_embeddings", "34")
    assert check_inputs(fits, resume=False) == tmp_path / "fits" / "run"
    short = tiny(tmp_path / "short", data_file, "--model.config_overrides.max_position_embeddings", "33")
    with pytest.raises(ConfigError, match="masks reach position 33, beyond the model's max_position_embeddings 33"):
        check_inputs(short, resume=False)
    assert not (tmp_path / "short" / "run").exists()


@pytest.mark.parametrize("trainable_dtype", [None, "float32"])
def test_trainables_and_moments_keep_their_dtype_over_a_bf16_base(tmp_path, data_file, trainable_dtype):
    """A bf16 base: the trainables (LoRA, sampler, a trained <mask> row) and AdamW's moments are in
    model.trainable_dtype (default: the base's param_dtype), after updates too (fp32 grads once promoted bf16
    moments, and the second call of the compiled step refused the changed state); the base stays bf16."""
    from mtp_jax.train.state import load_base, model_config, training_mesh

    extra = ("--model.trainable_dtype", trainable_dtype) if trainable_dtype else ()
    cfg = tiny(tmp_path, data_file, "--model.dtype", "bfloat16", "--model.param_dtype", "bfloat16",
               "--mtp.train_mask_embedding", "true", "--train.max_steps", "3", "--train.save_steps", "3", *extra)
    out = run(cfg)
    want = jnp.dtype(trainable_dtype or "bfloat16")
    state = out["state"]
    assert "mask_embedding" in state["trainable"]
    for part in ("trainable", "opt_state"):
        dtypes = {x.dtype for x in jax.tree.leaves(state[part]) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {want}, f"{part}: {dtypes}, want {want}"
    assert len(out["history"]) == 3
    base = load_base(cfg, model_config(cfg), *training_mesh(cfg))
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}


def test_trainable_dtype_must_be_a_float_dtype(tmp_path, data_file):
    with pytest.raises(ConfigError, match=r"model\.trainable_dtype must be float32\|bfloat16\|float16, got 'float64'"):
        tiny(tmp_path, data_file, "--model.trainable_dtype", "float64")


@pytest.mark.parametrize("packing", ["false", "true"])
def test_prefix_split_run_equals_dense_mask_run(tmp_path, data_file, packing):
    """The CLI, with one example per row (data.packing false) or packed rows: mtp.prefix_split
    (configs/qwen3_8b_k4_long.yaml) trains the same run as the dense prefix mask, step for step."""
    runs = {split: run(tiny(tmp_path / split, data_file, "--data.packing", packing, "--mtp.prefix_split", split,
                            "--train.max_steps", "3", "--train.save_steps", "3"))["history"]
            for split in ("false", "true")}
    for dense, split in zip(runs["false"], runs["true"], strict=True):
        for key in ("loss/total", "grad_norm", "acc/step_1"):
            assert abs(dense[key] - split[key]) <= 1e-5 * max(1.0, abs(dense[key])), (key, dense, split)


def test_layer_loop_run_equals_scanned_run(tmp_path, data_file):
    """The CLI with mtp.scan_layers false (the per-layer frozen base, unstacked once before the loop) trains
    the scanned run step for step, and its trained adapters keep the stacked layout that checkpoints, export
    and decoding use."""
    runs = {scan: run(tiny(tmp_path / scan, data_file, "--mtp.scan_layers", scan, "--train.max_steps", "3",
                           "--train.save_steps", "3"))
            for scan in ("true", "false")}
    for scanned, loop in zip(runs["true"]["history"], runs["false"]["history"], strict=True):
        for key in ("loss/total", "grad_norm", "acc/step_1"):
            assert abs(scanned[key] - loop[key]) <= 1e-5 * max(1.0, abs(scanned[key])), (key, scanned, loop)
    shapes = [jax.tree.map(jnp.shape, r["state"]["trainable"]) for r in runs.values()]
    assert shapes[0] == shapes[1]
