"""The bad-input catalogue (issue 10): one table, one case per row.

A case is an input (files under tests/bad_inputs/files/, used as they are or damaged in a copy), the
command or function that reads it (by default the training CLI, which must exit with status 2), and
the error it must end in, as three patterns searched in the message: what is wrong, where (file, and
record and line or the config key where they apply) and how to fix it. Every case runs in a fresh
workspace holding a run directory (a copy of files/run, a run that can be resumed, or an empty one),
a data cache and a model cache; their trees (every path and its bytes) are hashed before and after.
The run directory, the model cache and the fixtures must be unchanged; in the data cache nothing may
change or vanish and nothing partial may appear: a complete new entry (with _SUCCESS, a valid build
that a later run reuses) and the empty `<key>.lock` of the build lock (flock needs it kept) may.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pytest

from mtp_jax.checkpoints import CheckpointError, load_run, restore_trainable
from mtp_jax.models import ModelLoadError, UnsupportedModelError, load_model
from mtp_jax.train.__main__ import main

FILES = Path(__file__).parent / "files"
TINY = Path(__file__).parents[2] / "configs" / "tiny_test.yaml"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    what: str  # regexes searched in the error text; {ws} and {files} stand for the workspace and FILES
    where: str
    fix: str
    argv: tuple[str, ...] = ()  # training CLI flags after the base ones (the tiny config, good data, ws paths)
    config: str | None = None  # --config FILE instead of the tiny config
    call: Callable[[Path], object] | None = None  # instead of the CLI: a function of the workspace, must raise
    error: type | tuple = Exception
    setup: Callable[[Path], None] | None = None  # damages copies of the fixtures inside the workspace
    run_dir: str = "new"  # "new": an empty run dir; "run": a copy of files/run (config.yaml + checkpoint 2)


# ----------------------------------------------------------------------------- setups (damaged copies)

def model_copy(ws: Path) -> Path:
    return shutil.copytree(FILES / "model", ws / "model")


def edit_model_config(**changes):
    def setup(ws):
        d = model_copy(ws)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return setup


def damage_model_file(name: str, damage: Callable[[bytes], bytes]):
    def setup(ws):
        f = model_copy(ws) / name
        f.write_bytes(damage(f.read_bytes()))
    return setup


def sharded_with_a_shard_missing(ws):
    from safetensors.numpy import load_file, save_file

    d = model_copy(ws)
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:6], "model-00002-of-00002.safetensors": names[6:]}
    save_file({n: tensors[n] for n in names[:6]}, str(d / "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def real_checkpoint(ws, torn: bool = False):
    """A committed orbax checkpoint (step 2) of a small trainable tree in the run dir, its array files torn."""
    import orbax.checkpoint as ocp

    state = {"step": np.int32(2), "trainable": {"lora": {"a": np.ones((4, 2), np.float32)}}}
    with ocp.CheckpointManager((ws / "run" / "checkpoints").absolute()) as manager:
        shutil.rmtree(ws / "run" / "checkpoints" / "2")
        manager.reload()
        manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    if torn:
        for f in (ws / "run" / "checkpoints" / "2").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[:7])


def without_checkpoints(ws):
    shutil.rmtree(ws / "run" / "checkpoints")


def garbled_run_config(ws):
    (ws / "run" / "config.yaml").write_text("model: [unclosed\n")


def save_dir_under_a_file(ws):
    (ws / "a_file").write_text("")


def offline_hub(ws: Path, repo_id: str):
    """load_model(repo_id) against an empty hub cache in the workspace, offline (as on CI)."""
    with mock.patch.dict(os.environ, {"HF_HUB_CACHE": str(ws / "hub"), "HF_HUB_OFFLINE": "1"}):
        return load_model(repo_id)


# ----------------------------------------------------------------------------- the catalogue

D = "{files}/data"
CASES = [
    # data files (through the training CLI: caught before the base model is loaded)
    Case("data_missing", r"file not found", r"data\.train_file: .*nope\.jsonl",
         r"point it at a \.json/\.jsonl/\.parquet/\.arrow file",
         argv=("--data.train_file", "{ws}/nope.jsonl")),
    Case("data_directory", r"is a directory", r"data\.train_file: .*/data", r"expected a \.json or \.jsonl file",
         argv=("--data.train_file", D)),
    Case("data_eval_missing", r"file not found", r"data\.eval_file: .*gone\.json", r"point it at",
         argv=("--data.eval_file", "{ws}/gone.json")),
    Case("data_empty", r"file is empty", r"data/empty\.jsonl", r"expected a JSON list of \{\"input\", \"output\"\}",
         argv=("--data.train_file", f"{D}/empty.jsonl")),
    Case("data_invalid_json_line", r"invalid JSON \(", r"invalid_json\.jsonl: record 2 \(line 2\)",
         r"fix the record, or set on_bad_record to skip", argv=("--data.train_file", f"{D}/invalid_json.jsonl")),
    Case("data_missing_field", r"missing \"output\" \(keys present: \['answer', 'input'\]\)",
         r"missing_output\.jsonl: record 2 \(line 2\)", r"fix the record, or set on_bad_record to skip",
         argv=("--data.train_file", f"{D}/missing_output.jsonl")),
    Case("data_truncated_array", r"file ends inside the array|invalid JSON", r"truncated\.json: record 2 \(line 3\)",
         r"repair the file", argv=("--data.train_file", f"{D}/truncated.json")),
    Case("data_not_utf8", r"invalid UTF-8 at byte \d+", r"latin1\.json.*near line 2", r"save it as UTF-8",
         argv=("--data.train_file", f"{D}/latin1.json")),
    Case("data_all_records_bad", r"no usable examples \(2 bad records skipped; first: .*\"output\" must be a string",
         r"all_bad\.jsonl", r"fix the records", argv=("--data.train_file", f"{D}/all_bad.jsonl",
                                                     "--data.on_bad_record", "skip")),
    Case("data_bad_role", r"role 'bot' is not one of \['system', 'user', 'assistant'\]",
         r"bad_role\.jsonl: record 2 \(line 2\): \"messages\"\[1\]", r"fix the record, or set on_bad_record to skip",
         argv=("--data.train_file", f"{D}/bad_role.jsonl")),
    Case("data_parquet_garbage", r"not a readable parquet file", r"garbage\.parquet", r"write it again",
         argv=("--data.train_file", "{ws}/garbage.parquet"),
         setup=lambda ws: (ws / "garbage.parquet").write_bytes(b"PAR1 this is not a parquet file")),
    Case("data_too_small", r"its 2 examples make no full batch of 8 rows", r"two_records\.jsonl",
         r"add data, lower data\.batch_size", argv=("--data.train_file", f"{D}/two_records.jsonl")),
    # configs
    Case("config_unknown_key", r"lrr: unknown key", r"unknown_key\.yaml: optim\.lrr", r"did you mean 'lr'",
         config="{files}/configs/unknown_key.yaml"),
    Case("config_wrong_type", r"expected an integer, got 'ten'", r"wrong_type\.yaml: train\.max_steps",
         r"expected an integer", config="{files}/configs/wrong_type.yaml"),
    Case("config_invalid_yaml", r"invalid YAML", r"invalid_yaml\.yaml: line 4", r"fix the syntax there",
         config="{files}/configs/invalid_yaml.yaml"),
    Case("config_not_a_mapping", r"got list", r"top_level_list\.yaml", r"expected a mapping at the top level",
         config="{files}/configs/top_level_list.yaml"),
    Case("config_bad_value", r"need lr > 0", r"bad_value\.yaml: optim", r"need lr > 0",
         config="{files}/configs/bad_value.yaml"),
    Case("config_tail_chunk_not_a_divisor", r"got tail_chunk 3, chunk_size 8", r"mtp",
         r"0 or a divisor of chunk_size below it", argv=("--mtp.chunk_size", "8", "--mtp.tail_chunk", "3")),
    Case("config_missing_file", r"config file not found", r"nope\.yaml", r"pass a YAML file",
         config="{ws}/nope.yaml"),
    Case("config_value_not_allowed", r"got 'chatml'", r"data\.prompt_format", r"expected one of \['chat', 'raw'\]",
         argv=("--data.prompt_format", "chatml")),
    Case("config_tokenizer_larger_than_model", r"49152 tokens but the model's embedding table has 1000 rows",
         r"model\.tokenizer: smollm2-135m-instruct", r"use the base model's own tokenizer",
         argv=("--model.config_overrides.vocab_size", "1000")),
    Case("config_longer_than_the_model", r"masks reach position 33, beyond the model's max_position_embeddings 32",
         r"data\.max_total_tokens 32 with mtp\.draft_length 2", r"lower data\.max_total_tokens to at most 30",
         argv=("--model.config_overrides.max_position_embeddings", "32")),
    Case("config_overrides_need_random_init", r"config_overrides needs model\.random_init: true", r"model",
         r"real weights fix the shapes", argv=("--model.random_init", "false")),
    # CLI flags
    Case("flag_config_without_path", r"--config: missing the YAML path", r"--config", r"--config configs/NAME\.yaml",
         argv=("--config",)),
    Case("flag_override_without_value", r"missing value", r"--train\.max_steps", r"--dotted\.key VALUE",
         argv=("--train.max_steps",)),
    Case("flag_not_an_override", r"override 'steps=5'", r"steps=5", r"expected --dotted\.key VALUE",
         argv=("steps=5",)),
    Case("flag_unknown_section", r"unknown key", r"optimizer", r"did you mean 'optim'", argv=("--optimizer.lr", "1")),
    # run directories and --resume
    Case("save_dir_not_writable", r"is not writable", r"train\.save_dir: .*a_file/run",
         r"choose a directory you can write", argv=("--train.save_dir", "{ws}/a_file/run"), setup=save_dir_under_a_file),
    Case("save_dir_holds_a_run", r"already holds checkpoints", r"train\.save_dir: .*run",
         r"pass --resume to continue or choose a new save_dir", run_dir="run"),
    Case("resume_with_other_k", r"trained with a different setup", r"mtp\.draft_length: checkpoint 2, now 3",
         r"resume with the saved config", argv=("--resume", "--mtp.draft_length", "3"), run_dir="run"),
    Case("resume_with_other_model", r"trained with a different setup",
         r"model\.config_overrides: checkpoint .*'num_hidden_layers': 2.* now .*'num_hidden_layers': 3",
         r"resume with the saved config", argv=("--resume", "--model.config_overrides.num_hidden_layers", "3"),
         run_dir="run"),
    Case("resume_with_other_grad_accum", r"trained with a different setup", r"optim\.grad_accum: checkpoint 1, now 2",
         r"or choose a new save_dir", argv=("--resume", "--optim.grad_accum", "2"), run_dir="run"),
    # model directories
    Case("model_missing", r"no such file or directory", r"nope", r"expected a HF model directory, a \.gguf file",
         call=lambda ws: load_model(ws / "nope"), error=ModelLoadError),
    Case("model_dir_without_config", r"no config\.json", r"model", r"expected a Hugging Face model directory",
         call=lambda ws: load_model(ws / "model"), error=ModelLoadError,
         setup=lambda ws: (model_copy(ws) / "config.json").unlink()),
    Case("model_without_weights", r"no model\.safetensors or model\.safetensors\.index\.json", r"model",
         r"convert \.bin checkpoints", call=lambda ws: load_model(ws / "model"), error=ModelLoadError,
         setup=lambda ws: (model_copy(ws) / "model.safetensors").unlink()),
    Case("model_weights_garbage", r"corrupt or truncated safetensors", r"model/model\.safetensors",
         r"download or convert the weights again", call=lambda ws: load_model(ws / "model"), error=ModelLoadError,
         setup=damage_model_file("model.safetensors", lambda b: b"\x13\x37not safetensors" * 10)),
    Case("model_weights_truncated", r"corrupt or truncated safetensors", r"model/model\.safetensors",
         r"download or convert the weights again", call=lambda ws: load_model(ws / "model"), error=ModelLoadError,
         setup=damage_model_file("model.safetensors", lambda b: b[: len(b) // 2])),
    Case("model_shard_missing", r"listed in the safetensors index but missing", r"model-00002-of-00002\.safetensors",
         r"download that shard", call=lambda ws: load_model(ws / "model"), error=ModelLoadError,
         setup=sharded_with_a_shard_missing),
    Case("model_shape_mismatch", r"has shape \(\d+, \d+\); config\.json implies \(\d+, \d+\)",
         r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight'",
         r"config\.json and the weights come from different models", call=lambda ws: load_model(ws / "model"),
         error=ModelLoadError, setup=edit_model_config(intermediate_size=12)),
    Case("model_unsupported_type", r"model_type 'gpt2' is not supported", r"model/config\.json",
         r"expected one of llama, qwen3", call=lambda ws: load_model(ws / "model"), error=UnsupportedModelError,
         setup=edit_model_config(model_type="gpt2")),
    Case("model_config_not_json", r"not valid JSON", r"model/config\.json: .*\(line 1", r"restore the model's Hugging Face",
         call=lambda ws: load_model(ws / "model"), error=ValueError,
         setup=lambda ws: (model_copy(ws) / "config.json").write_text("{ not json")),
    Case("model_repo_id_not_cached", r"holds no snapshot of it and HF_HUB_OFFLINE is set",
         r"org/missing: .*hub cache {ws}/hub", r"`hf download org/missing`",
         call=lambda ws: offline_hub(ws, "org/missing"), error=ModelLoadError),
    # GGUF files
    Case("gguf_other_architecture", r"GGUF architecture 'gpt2' is not supported", r"gpt2\.gguf",
         r"expected one of \['llama', 'qwen3'\]", call=lambda ws: load_model(FILES / "gpt2.gguf"),
         error=ModelLoadError),
    Case("gguf_garbage", r"not a readable GGUF file", r"broken\.gguf", r"download it again",
         call=lambda ws: load_model(ws / "broken.gguf"), error=ModelLoadError,
         setup=lambda ws: (ws / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)),
    Case("gguf_wrong_suffix", r"a file that is not \.gguf", r"weights\.bin", r"expected a HF model directory or a \.gguf",
         call=lambda ws: load_model(ws / "weights.bin"), error=ModelLoadError,
         setup=lambda ws: (ws / "weights.bin").write_bytes(b"xx")),
    # checkpoints (reading a run back: export, decoding)
    Case("ckpt_not_a_run_dir", r"not a training run directory \(no config\.yaml\)", r"model",
         r"pass the save_dir of a `python -m mtp_jax\.train` run", call=lambda ws: load_run(FILES / "model"),
         error=CheckpointError),
    Case("ckpt_none_committed", r"no committed checkpoint", r"run/checkpoints", r"train it \(--resume\) until it saves",
         call=lambda ws: restore_trainable(ws / "run"), error=CheckpointError, run_dir="run",
         setup=without_checkpoints),
    Case("ckpt_step_missing", r"no checkpoint for step 7", r"run/checkpoints", r"pick one of the saved steps: \[2\]",
         call=lambda ws: restore_trainable(ws / "run", 7), error=CheckpointError, run_dir="run"),
    Case("ckpt_torn", r"checkpoint of step 2 is torn or unreadable", r"run/checkpoints/2/state",
         r"pick another of the committed steps: \[2\]", call=lambda ws: restore_trainable(ws / "run"),
         error=CheckpointError, run_dir="run", setup=lambda ws: real_checkpoint(ws, torn=True)),
    Case("ckpt_run_config_garbled", r"unreadable run config", r"run/config\.yaml", r"restore it from the copy",
         call=lambda ws: load_run(ws / "run"), error=CheckpointError, run_dir="run", setup=garbled_run_config),
]


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256 of its bytes, or 'dir'} for everything under root."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def allowed_in_data_cache(root: Path, new: str) -> bool:
    top = root / Path(new).parts[0]
    return (top.suffix == ".lock" and top.stat().st_size == 0) or (top / "_SUCCESS").is_file()


def prepare(ws: Path, case: Case) -> dict[str, Path]:
    """The workspace: run dir, a data cache holding a previous build, a model cache holding a converted model."""
    if case.run_dir == "run":
        shutil.copytree(FILES / "run", ws / "run")
    else:
        (ws / "run").mkdir()
    for cache in ("data_cache/0123456789abcdef", "model_cache/gguf/previous-0123"):
        (ws / cache).mkdir(parents=True)
        (ws / cache / "_SUCCESS").write_text("")
    if case.setup:
        case.setup(ws)
    return {"run dir": ws / "run", "data cache": ws / "data_cache", "model cache": ws / "model_cache",
            "fixtures": FILES}


def error_text(case: Case, ws: Path, capsys) -> str:
    fill = lambda s: s.replace("{ws}", str(ws)).replace("{files}", str(FILES))  # noqa: E731
    if case.call is not None:
        with pytest.raises(case.error) as info:
            case.call(ws)
        return str(info.value)
    argv = ["--config", fill(case.config) if case.config else str(TINY)]
    if case.config is None:
        argv += ["--data.train_file", str(FILES / "data" / "good.jsonl")]
    argv += ["--data.cache_dir", str(ws / "data_cache"), "--train.save_dir", str(ws / "run"),
             *[fill(a) for a in case.argv]]
    if case.argv[:1] == ("--config",):
        argv = list(case.argv)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, f"exit status {status}, not 2 (bad input):\n{err[-2000:]}"
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, f"not a one-line error:\n{err[-2000:]}"
    return last


def test_catalogue_has_the_promised_breadth():
    kinds = {case.id.split("_")[0] for case in CASES}
    assert {"data", "config", "flag", "model", "gguf", "ckpt"} <= kinds, kinds
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    ws = tmp_path
    if case.call is not None:  # the CLI needs the real model cache for the tokenizer alias
        monkeypatch.setenv("MTP_JAX_CACHE", str(ws / "model_cache"))
    guarded = prepare(ws, case)
    before = {name: tree(path) for name, path in guarded.items()}
    text = error_text(case, ws, capsys)
    for part in ("what", "where", "fix"):
        pattern = getattr(case, part).replace("{ws}", re.escape(str(ws))).replace("{files}", re.escape(str(FILES)))
        assert re.search(pattern, text), f"{case.id}: the error does not say {part} ({pattern!r}):\n{text}"
    for name, path in guarded.items():
        after = tree(path)
        changed = sorted(k for k in before[name] if after.get(k) != before[name][k])
        added = sorted(k for k in after if k not in before[name]
                       and not (name == "data cache" and allowed_in_data_cache(path, k)))
        assert not changed and not added, f"{case.id}: the {name} ({path}) changed: {changed} added: {added}"
