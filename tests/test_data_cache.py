"""ArrayRecord cache: hit on rerun and for any k, miss when the file or tokenizer changes, atomic and lock-safe."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mtp_jax.data import DataConfig, prepare
from mtp_jax.data.cache import BuildParams, build_cache, decode_example, is_complete
from mtp_jax.data.readers import DataError
from mtp_jax.data.tokenize import TokenizeParams

PARAMS = BuildParams(TokenizeParams("chat", 128, 256))

BUILD_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
from mtp_jax.data.cache import BuildParams, build_cache
from mtp_jax.data.tokenize import TokenizeParams
tok = AutoTokenizer.from_pretrained(sys.argv[3])
c = build_cache(sys.argv[1], tok, BuildParams(TokenizeParams("chat", 128, 256)), sys.argv[2])
print(json.dumps({"built": c.built, "path": str(c.path), "pid": c.manifest["builder_pid"]}), flush=True)
"""


@pytest.fixture(scope="module")
def tok():
    from mtp_jax.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def write_data(path, n, seed=0):
    r = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"input": f"q{i} " + "word " * int(r.integers(1, 40)),
                                "output": "answer " * int(r.integers(1, 60))}) + "\n")
    return path


def test_hit_on_rerun_and_contents(tmp_path, tok):
    data = write_data(tmp_path / "d.jsonl", 50)
    first = build_cache(data, tok, PARAMS, tmp_path / "cache")
    second = build_cache(data, tok, PARAMS, tmp_path / "cache")
    assert first.built and not second.built, "rerun did not reuse the cache"
    assert first.path == second.path and (first.path / "_SUCCESS").exists()
    assert second.manifest["examples"] == 50 and len(second.lengths) == 50
    assert second.token_counts().sum() == second.manifest["anchors"], "token counts are not the responses'"
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(second.shards[0])
    tokens, spans = decode_example(reader.read([0])[0])
    prompt_len = spans[0, 0]
    user = [{"role": "user", "content": json.loads(open(data).readline())["input"]}]
    assert tokens[:prompt_len].tolist() == list(tok.apply_chat_template(user, add_generation_prompt=True,
                                                                           return_dict=False))


def test_miss_after_file_change(tmp_path, tok):
    data = write_data(tmp_path / "d.jsonl", 20)
    a = build_cache(data, tok, PARAMS, tmp_path / "cache")
    with open(data, "a") as f:
        f.write(json.dumps({"input": "new", "output": "record"}) + "\n")
    b = build_cache(data, tok, PARAMS, tmp_path / "cache")
    assert b.built and b.path != a.path and b.manifest["examples"] == 21


def test_miss_after_tokenizer_change(tmp_path, tok):
    data = write_data(tmp_path / "d.jsonl", 20)
    a = build_cache(data, tok, PARAMS, tmp_path / "cache")
    t = copy.deepcopy(tok)
    t.chat_template = tok.chat_template.replace("helpful", "useful")
    b = build_cache(data, t, PARAMS, tmp_path / "cache")
    assert b.built and b.path != a.path


def test_draft_lengths_share_one_cache(tmp_path, tok):
    """Two data configs that differ only in k: the second reuses the first's cache folder."""
    data = write_data(tmp_path / "d.jsonl", 20)
    cfg = DataConfig(train_file=str(data), eval_file=None, cache_dir=str(tmp_path / "cache"), max_prompt_tokens=128,
                     max_total_tokens=256)
    a, b = prepare(cfg, tok, draft_length=4), prepare(cfg, tok, draft_length=3)
    assert a.built and not b.built and a.path == b.path, (a.path, b.path)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [a.path.name]


def test_rebuild_forces(tmp_path, tok):
    data = write_data(tmp_path / "d.jsonl", 20)
    a = build_cache(data, tok, PARAMS, tmp_path / "cache")
    b = build_cache(data, tok, PARAMS, tmp_path / "cache", rebuild=True)
    assert b.built and b.path == a.path and is_complete(b.path)


def test_skip_policy_counts_bad_records(tmp_path, tok):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "q", "output": "a"}) + "\n{broken\n" + json.dumps({"input": "q"}) + "\n")
    with pytest.raises(DataError, match="record 2"):
        build_cache(data, tok, PARAMS, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/_SUCCESS")), "a failed build left a cache"
    c = build_cache(data, tok, BuildParams(PARAMS.tokenize, "skip"), tmp_path / "cache")
    assert c.manifest["examples"] == 1 and c.manifest["skipped"] == 2


def test_short_responses_are_counted(tmp_path, tok):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "q", "output": "ok"}) + "\n")
    c = build_cache(data, tok, PARAMS, tmp_path / "cache")
    assert (c.short_responses(8), c.short_responses(1)) == (1, 0)


def _spawn(data, cache):
    from mtp_jax.models import resolve_model_dir

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS="cpu")
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(data), str(cache), str(model_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_killed_build_leaves_no_usable_cache(tmp_path, tok):
    data = write_data(tmp_path / "d.jsonl", 5000)
    cache = tmp_path / "cache"
    proc = _spawn(data, cache)
    deadline = time.time() + 120
    while not list(cache.glob(".tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"builder ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in cache.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"], \
        "a killed build left a cache folder under its key"
    small = write_data(tmp_path / "small.jsonl", 10)
    assert build_cache(small, tok, PARAMS, cache).built
    c = build_cache(data, tok, PARAMS, cache)  # same key as the killed build: built afresh, stale temp removed
    assert c.built and c.manifest["examples"] == 5000
    assert not list(cache.glob(".tmp-*")), "stale temp folder not cleaned"


def test_two_concurrent_builders_make_one_cache(tmp_path):
    data = write_data(tmp_path / "d.jsonl", 1500)
    cache = tmp_path / "cache"
    procs = [_spawn(data, cache) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(r["built"] for r in results) == [False, True], results
    assert results[0]["path"] == results[1]["path"] and results[0]["pid"] == results[1]["pid"]
    assert is_complete(tmp_path / "cache" / os.path.basename(results[0]["path"]))
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_cli_reports_skipped_records(tmp_path, capsys):
    from mtp_jax.data.__main__ import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "q", "output": "a"}) + "\n" + json.dumps({"input": "q", "output": 1}) + "\n")
    argv = ["--data.train_file", str(data), "--data.eval_file", "null", "--data.cache_dir", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and 'record 2 (line 2): "output" must be a string' in err, err
    assert main(argv + ["--on_bad_record", "skip"]) == 0
    out = capsys.readouterr().out
    assert "train: 1 examples" in out and "1 bad records skipped" in out, out
