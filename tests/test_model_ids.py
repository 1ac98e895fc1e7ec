"""Hugging Face repo ids as model paths: resolved offline from a fake hub cache (the layout huggingface_hub
writes), a clear error naming the cache and the download command when the id is not cached, and no
network use in any test (sockets refuse to open)."""

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

import huggingface_hub
from mtp_jax.models import ModelLoadError, load_model, resolve_model_dir
from mtp_jax.models.loading import is_repo_id
from mtp_jax.paths import absolute_if_local

MODEL = Path(__file__).parent / "bad_inputs" / "files" / "model"  # a tiny HF directory: config + safetensors
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """HF_HUB_CACHE at a tmp dir holding org/tiny as huggingface_hub lays it out; offline; no sockets."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(MODEL, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return cache


def test_repo_id_resolves_offline_from_the_cache(hub):
    d = resolve_model_dir("org/tiny")
    assert d == hub / "models--org--tiny" / "snapshots" / REVISION
    _, from_hub, _ = load_model("org/tiny")
    _, from_dir, _ = load_model(MODEL)
    import jax

    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), from_hub, from_dir)
    assert all(jax.tree_util.tree_leaves(same)), "weights through the repo id differ from the local directory's"


def test_missing_repo_id_names_the_cache_and_the_command(hub):
    with pytest.raises(ModelLoadError) as e:
        resolve_model_dir("Qwen/Qwen3-8B")
    msg = str(e.value)
    assert str(hub) in msg and "HF_HUB_OFFLINE is set" in msg, msg
    assert "hf download Qwen/Qwen3-8B" in msg and "huggingface-cli download Qwen/Qwen3-8B" in msg, msg


def test_unreachable_hub_gives_the_same_advice(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    real = huggingface_hub.snapshot_download

    def no_network(repo_id, **kw):  # the download attempt, answered as an unreachable hub answers it
        if not kw.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach huggingface.co")
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelLoadError, match=r"org/other: .*downloading it failed \(LocalEntryNotFoundError: "
                                             r"cannot reach huggingface\.co\); fill the cache .*hf download org/other"):
        resolve_model_dir("org/other")
    assert resolve_model_dir("org/tiny").name == REVISION, "a cached snapshot needs no download"


def test_snapshot_without_weights_is_not_used(hub):
    (hub / "models--org--tiny" / "snapshots" / REVISION / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="without config.json and safetensors weights"):
        resolve_model_dir("org/tiny")


def test_local_paths_and_aliases_are_not_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    shutil.copytree(MODEL, tmp_path / "org" / "local")
    assert resolve_model_dir("org/local") == tmp_path / "org" / "local", "an existing local dir wins over the hub"
    assert absolute_if_local("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B", "config load must keep a repo id unchanged"
    assert is_repo_id("Qwen/Qwen3-8B") and not is_repo_id("smollm2-135m-instruct")
    assert not is_repo_id("./org/x") and not is_repo_id("/abs/path") and not is_repo_id("a/b/c")
    with pytest.raises(ModelLoadError, match="no such file or directory.*Hugging Face repo id"):
        resolve_model_dir(tmp_path / "nope")
