"""Bad model inputs end in a clear error naming the file and what was expected."""

import json
import shutil

import numpy as np
import pytest

from conftest import make_hf_model, save_hf
from mtp_jax.models import ModelLoadError, UnsupportedModelError, load_model


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save_hf(make_hf_model("llama"), tmp_path_factory.mktemp("good"))


def copy(good_dir, tmp_path):
    return shutil.copytree(good_dir, tmp_path / "m")


def test_missing_dir(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope.*no such file or directory.*HF model directory"):
        load_model(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty: no config.json"):
        load_model(tmp_path / "empty")


def test_missing_safetensors(good_dir, tmp_path):
    d = copy(good_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model.safetensors or model.safetensors.index.json"):
        load_model(d)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(good_dir, tmp_path, damage):
    d = copy(good_dir, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x13\x37not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model.safetensors: corrupt or truncated"):
        load_model(d)


def test_missing_tensor_in_shard_index(tmp_path):
    d = save_hf(make_hf_model("llama"), tmp_path / "s", sharded=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    with pytest.raises(ModelLoadError, match=rf"{shard}: listed in the safetensors index but missing"):
        load_model(d)


def test_shape_mismatch_names_tensor(good_dir, tmp_path):
    d = copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"'model.layers.0.mlp.\w+_proj.weight' has shape \(\d+, \d+\); config.json implies"):
        load_model(d)


def test_unsupported_architecture(good_dir, tmp_path):
    d = copy(good_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config.json: model_type 'gpt2' is not supported.*llama, qwen3"):
        load_model(d)


def test_invalid_config_json(good_dir, tmp_path):
    d = copy(good_dir, tmp_path)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(line 1"):
        load_model(d)


def test_gguf_of_another_architecture(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("MTP_JAX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"gpt2.gguf: GGUF architecture 'gpt2' is not supported"):
        load_model(path)
    assert not (tmp_path / "cache" / "gguf").exists() or not any(
        p.name.startswith("gpt2") for p in (tmp_path / "cache" / "gguf").iterdir()), "a failed conversion left a cache entry"


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"xx")
    with pytest.raises(ModelLoadError, match=r"weights.bin: a file that is not .gguf"):
        load_model(path)
