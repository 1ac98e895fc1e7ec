"""Relative paths, as a user types them: the CLIs run from a working directory with relative run,
data, cache and output paths; a readable checkpoint is never called torn or set aside because a
library call failed; the README's own commands run as documented (shortened to a few steps).
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import orbax.checkpoint as ocp
import pytest
import yaml

from conftest import make_hf_model, save_hf
from mtp_jax import export, generate
from mtp_jax.train import __main__ as train
from mtp_jax.checkpoints import CheckpointError, committed_steps, load_run, restore_trainable
from test_export import TOKENIZER_SIZE, tiny_tokenizer
from test_train import write_data

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")


def train_argv(*more: str) -> list[str]:
    """The tiny config on the base in ./base, everything relative to the working directory."""
    return ["--config", TINY, "--model.path", "base", "--model.random_init", "false", "--model.tokenizer", "base",
            "--model.config_overrides", "{}", "--data.train_file", "train.jsonl", "--data.cache_dir", "cache",
            "--train.save_dir", "run", "--train.max_steps", "2", "--train.save_steps", "2", *more]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding a tiny Llama base (./base) and data (./train.jsonl)."""
    ws = tmp_path_factory.mktemp("relative")
    data = write_data(ws / "train.jsonl")
    base = save_hf(make_hf_model("llama"), ws / "base")
    tiny_tokenizer(TOKENIZER_SIZE["llama"], [v for line in open(data) for v in json.loads(line).values()]) \
        .save_pretrained(base)
    return ws


@pytest.fixture(scope="module")
def trained(workdir):
    """`run`: 2 steps trained from the working directory with relative paths."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert train.main(train_argv()) == 0, "training with relative paths failed"
    return workdir


def test_generate_export_and_resume_take_relative_paths(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    assert restore_trainable("run")[0] == 2, "the relative run dir's latest step was not restored"
    assert load_run("run").step == 2
    assert generate.main(["--adapter", "run", "--prompt", "What is two plus two?", "--raw", "--max_new_tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().err, "generate --adapter with a relative run dir printed no report"
    assert export.main(["--run_dir", "run", "--out", "exported", "--dtype", "float32"]) == 0
    assert (trained / "exported" / "config.json").is_file() and (trained / "exported" / "mtp_adapter.safetensors").is_file()
    assert train.main(train_argv("--train.max_steps", "3", "--train.save_steps", "3", "--resume")) == 0
    assert committed_steps("run")[-1] == 3, "--resume with relative paths did not continue to step 3"
    saved = yaml.safe_load((trained / "run" / "config.yaml").read_text())
    assert Path(saved["train"]["save_dir"]).is_absolute() and Path(saved["model"]["path"]).is_absolute(), \
        "the saved config holds relative paths: the run would not survive another working directory"


def test_library_failure_is_not_a_torn_checkpoint(trained, monkeypatch, capfd):
    """orbax failing in an unexpected way (here a TypeError from its metadata or restore call) is
    reported as such, and --resume stops without setting any committed step aside."""
    monkeypatch.chdir(trained)
    steps = committed_steps("run")

    def broken(*args, **kwargs):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(ocp.StandardCheckpointer, "metadata", broken)
    with pytest.raises(CheckpointError) as e:
        restore_trainable("run")
    assert "torn" not in str(e.value) and "failed inside orbax-checkpoint" in str(e.value), str(e.value)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", broken)
    assert train.main(train_argv("--train.max_steps", "9", "--resume")) == 2
    assert "failed inside orbax-checkpoint" in capfd.readouterr().err
    assert committed_steps("run") == steps and not (trained / "run" / "torn_checkpoints").exists(), \
        "a readable checkpoint was set aside after a library failure"


def readme_command(module: str) -> list[str]:
    """The README's documented `python -m <module> ...` command (the first one), as argv."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"python -m {re.escape(module)} [^`\n&\[]*", text)
    assert found, f"README documents no `python -m {module}` command"
    return shlex.split(found.group(0))


def test_readme_commands_run_as_documented(tmp_path, smollm2_dir):
    """Train (the embedded default config, cut to 2 steps and no eval), generate --adapter and export,
    each as the README writes it, from a fresh working directory with the README's relative paths."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    short = ["--train.max_steps", "2", "--train.save_steps", "2", "--data.eval_file", "null"]
    for argv in (readme_command("mtp_jax.train") + short,
                 readme_command("mtp_jax.generate --adapter") + ["--max_new_tokens", "8"],
                 readme_command("mtp_jax.export")):
        argv = [sys.executable if a == "python" else a for a in argv]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stderr[-3000:]}"
    assert (tmp_path / "exports" / "smollm2_k4" / "model.safetensors").is_file()
