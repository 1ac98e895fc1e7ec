"""Export: a training run -> a Hugging Face model directory plus the MTP adapter, for PyTorch serving.

`python -m mtp_jax.export --run_dir runs/x [--step N] --out out_dir [--dtype bfloat16] [--overwrite]`

out_dir/ holds the base model with the `<mask>` row (config.json, model.safetensors or shards + index,
tokenizer with `<mask>`, generation_config.json) and, beside it, mtp_adapter.safetensors (the gated
LoRA, unfused, PEFT layout, and the sampler head) and mtp_config.json. Base tensors stream one at a
time from the base model's safetensors straight into the output files (host RAM holds a tensor or
two, never the model); the directory is built beside out_dir and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from mtp_jax import cli
from mtp_jax.checkpoints import CheckpointError, load_run
from mtp_jax.models.llama import CausalLM
from mtp_jax.models.loading import SafetensorsReader, abstract_params, hf_name, hf_tensors, resolve_model_dir
from mtp_jax.models.lora import FUSED_MODULES
from mtp_jax.mtp.mask_token import table_rows_after
from mtp_jax.paths import absolute

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
ADAPTER_FILE = "mtp_adapter.safetensors"
MTP_CONFIG_FILE = "mtp_config.json"
SAMPLER_PREFIX = "mtp_sampler."
FORMAT_VERSION = 1
# numpy dtype and safetensors dtype tag per --dtype
DTYPES = {"float32": (np.dtype(np.float32), "F32"), "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
          "float16": (np.dtype(np.float16), "F16")}
# LoRA target -> HF module path inside a decoder layer
TARGET_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class ExportError(ValueError):
    """An export that cannot run as asked; nothing has been written or removed."""


def peak_rss_mib() -> float:
    """Peak resident set of this process. It counts the pages of the mmapped source safetensors that
    were read (page cache the kernel drops under memory pressure), so it overstates what export needs.
    Linux: VmHWM, since ru_maxrss carries a parent's peak across exec."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


log = functools.partial(cli.log, "export")


# ----------------------------------------------------------------------------- safetensors, streamed

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    def nbytes(self, dtype: np.dtype) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize


def write_safetensors(path: Path, specs: Sequence[TensorSpec], dtype: str, fetch: Callable[[str], np.ndarray]):
    """Writes a safetensors file tensor by tensor: the header comes from `specs`, then each
    `fetch(name)` is cast and written and dropped, so only one tensor is ever in memory."""
    np_dtype, tag = DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": tag, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes(np_dtype)]}
        offset += s.nbytes(np_dtype)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for s in specs:
            arr = np.ascontiguousarray(fetch(s.name), dtype=np_dtype)
            if arr.shape != s.shape:
                raise ExportError(f"tensor {s.name!r}: got shape {arr.shape}, expected {s.shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)  # raw bytes, no copy


def plan_shards(specs: Sequence[TensorSpec], dtype: str, max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order: a shard closes before the tensor that would take it past `max_bytes`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = s.nbytes(DTYPES[dtype][0])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def write_model_weights(out: Path, specs: Sequence[TensorSpec], dtype: str, fetch: Callable[[str], np.ndarray],
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`."""
    shards = plan_shards(specs, dtype, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", specs, dtype, fetch)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard, dtype, fetch)
        names.append(name)
        weight_map.update({s.name: name for s in shard})
    total = sum(s.nbytes(DTYPES[dtype][0]) for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]


# ----------------------------------------------------------------------------- the base model

def base_specs(config, rows: int) -> list[TensorSpec]:
    """HF names and [out, in] shapes of every base tensor our decoder uses, with `rows` vocab rows."""
    boxed = abstract_params(CausalLM(dataclasses.replace(config, vocab_size=rows)))
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return [TensorSpec(name, hf_shape) for key_path, leaf in flat
            for _, name, _, hf_shape in hf_tensors(tuple(k.key for k in key_path), nn.unbox(leaf).shape)]


def base_tensor_reader(reader, dtype: str, mask_id: int, mask_row: np.ndarray, rows: int
                       ) -> Callable[[str], np.ndarray]:
    """`fetch(name)` for the base tensors: read from the base model, cast, with the `<mask>` row in place.

    embed_tokens gets the `<mask>` embedding at `mask_id` (appended when the table had no free
    row); an untied lm_head gets a zero row there, so `<mask>` scores 0 and generation_config
    suppresses it besides. Casting first keeps the extra copy of a table in the output dtype.
    """
    np_dtype = DTYPES[dtype][0]

    def fetch(name: str) -> np.ndarray:
        arr = reader.get(name).astype(np_dtype)
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            return arr
        if rows > arr.shape[0]:
            arr = np.concatenate([arr, np.zeros((rows - arr.shape[0], arr.shape[1]), np_dtype)])
        arr[mask_id] = mask_row.astype(np_dtype) if name == "model.embed_tokens.weight" else 0
        return arr

    return fetch


def hf_config(src: dict, rows: int, dtype: str) -> dict:
    cfg = dict(src)
    cfg["vocab_size"] = rows
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype
    cfg.setdefault("architectures", [ARCHITECTURES[cfg["model_type"]]])
    return cfg


def write_generation_config(src_dir: Path, out: Path, mask_id: int):
    """The base model's generation config (or one derived from config.json), with `<mask>` suppressed."""
    from transformers import AutoConfig, GenerationConfig  # imports torch: only an export pays for it

    if (src_dir / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(src_dir)
    else:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(out))
    gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | {mask_id})
    gen.save_pretrained(out)


# ----------------------------------------------------------------------------- the MTP adapter

def adapter_tensors(lora_tree: dict, lora, config) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Our stacked adapters (leaves [layers, ...]) -> unfused PEFT-layout adapters
    {`model.layers.i.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r], `lora_B.bias` [out]}
    and each module's scale s.

    A fused q|k|v (gate|up) adapter becomes one adapter per projection: A is shared, so each gets a
    copy; B's columns are split by output; the scale stays that of the fused adapter (alpha 3a,
    rank 3r), so every projection computes exactly the delta it had in training.
    """
    sizes = {"q": config.q_features, "k": config.kv_features, "v": config.kv_features, "o": config.hidden_size,
             "gate": config.intermediate_size, "up": config.intermediate_size, "down": config.hidden_size}
    tensors, scales = {}, {}
    stacked = jax.tree.map(np.asarray, lora_tree["model"]["layers"])  # leaves [layers, ...]
    for i in range(config.num_layers):
        layer = jax.tree.map(lambda x: x[i], stacked)
        for group, (block, module) in FUSED_MODULES.items():
            members = lora.group(group)
            if not members:
                continue
            fused = layer[block][module]
            start = 0
            for t in members:
                cols = slice(start, start + sizes[t])
                start += sizes[t]
                part = {"lora_A": fused["lora_A"], "lora_B": fused["lora_B"][:, cols]}
                if "lora_bias" in fused:
                    part["lora_bias"] = fused["lora_bias"][cols]
                _add_adapter(tensors, f"model.layers.{i}.{TARGET_MODULES[t]}", part)
                scales[TARGET_MODULES[t].split(".")[1]] = lora.scale(len(members))
        for t, path in TARGET_MODULES.items():
            if lora.active(t) and not lora.fused(t):
                block, module = path.split(".")
                _add_adapter(tensors, f"model.layers.{i}.{path}", layer[block][module])
                scales[module] = lora.scale()
    return tensors, scales


def _add_adapter(tensors: dict, prefix: str, leaves: dict):
    tensors[f"{prefix}.lora_A.weight"] = np.asarray(leaves["lora_A"]).T
    tensors[f"{prefix}.lora_B.weight"] = np.asarray(leaves["lora_B"]).T
    if "lora_bias" in leaves:
        tensors[f"{prefix}.lora_B.bias"] = np.asarray(leaves["lora_bias"])


def sampler_tensors(sampler_tree: dict) -> dict[str, np.ndarray]:
    """`mtp_sampler.fc1.weight` [d, 2d], `fc2.weight` [d, d], `norm1.weight`, `norm2.weight` (torch layout)."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(sampler_tree)[0]:
        name, transpose = hf_name(tuple(k.key for k in key_path))
        out[SAMPLER_PREFIX + name] = np.asarray(leaf).T if transpose else np.asarray(leaf)
    return out


def mtp_config(run, scales: dict[str, float], rows: int, dtype: str) -> dict:
    cfg, lora = run.config, run.config.lora
    return {
        "format_version": FORMAT_VERSION,
        "draft_length": cfg.mtp.draft_length,
        "mask_token": cfg.mtp.mask_token,
        "mask_token_id": run.mask_id,
        "lora": {
            "rank": lora.rank, "alpha": lora.alpha, "rslora": lora.rslora, "dropout": lora.dropout,
            "bias": lora.bias, "target_modules": sorted(scales), "fused": False, "fused_in_training": lora.fuse,
            # per module: delta = scale * lora_B(lora_A(x)) (ranks differ where training fused adapters)
            "scale": scales,
        },
        "sampler": {"prefix": SAMPLER_PREFIX, "hidden_size": run.model.config.hidden_size,
                    "rms_norm_eps": run.model.config.rms_norm_eps,
                    "input": "concat(embed_tokens(prev), final_normed_hidden_at_mask)"},
        "base_model": {"path": cfg.model.path, "model_type": run.model.config.model_type,
                       "vocab_size": run.model.config.vocab_size, "text_vocab": run.text_vocab,
                       "exported_vocab_size": rows},
        "checkpoint": {"run_dir": str(run.run_dir), "step": run.step},
        "dtype": dtype,
    }


# ----------------------------------------------------------------------------- the command

def check_out_dir(out: Path, overwrite: bool, protected: Iterable[Path]):
    """Refuses, before any work, an out_dir that is a file, is not empty (without --overwrite), or
    would take the run or the base model with it."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    for p in protected:
        p = p.resolve()
        if p == out.resolve() or out.resolve() in p.parents:
            raise ExportError(f"--out {out}: would replace {p}, which the export reads; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: directory is not empty; pass --overwrite to replace it")


def replace_dir(tmp: Path, out: Path):
    """Puts the finished `tmp` at `out`; an old `out` is moved aside first and removed last."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)


def export(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None, dtype: str = "bfloat16",
           overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes the HF directory + MTP adapter of `run_dir` at `step` (default: latest) to `out`."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    run_dir, out = absolute(run_dir), absolute(out)
    check_out_dir(out, overwrite, [run_dir])  # before reading anything
    run = load_run(run_dir, step, load_base=False)
    src_dir = resolve_model_dir(run.config.model.path)
    check_out_dir(out, overwrite, [run_dir, src_dir])
    config = run.model.config
    rows = table_rows_after(config.vocab_size, run.mask_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    try:
        reader = SafetensorsReader(src_dir)
        fetch = base_tensor_reader(reader, dtype, run.mask_id, np.asarray(run.params["mask_embedding"]), rows)
        specs = base_specs(config, rows)
        write_model_weights(tmp, specs, dtype, fetch, max_shard_bytes)
        size = sum(s.nbytes(DTYPES[dtype][0]) for s in specs)
        log(f"streamed {len(specs)} base tensors ({size / 2**20:.0f} MiB {dtype}) from {src_dir}")
        src_config = json.loads((src_dir / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(hf_config(src_config, rows, dtype), indent=2))
        run.tokenizer.save_pretrained(tmp)
        write_generation_config(src_dir, tmp, run.mask_id)

        adapters, scales = adapter_tensors(run.params["lora"], run.config.lora, config)
        extra = {**adapters, **sampler_tensors(run.params["sampler"])}
        write_safetensors(tmp / ADAPTER_FILE, [TensorSpec(k, v.shape) for k, v in extra.items()], dtype,
                          extra.__getitem__)
        (tmp / MTP_CONFIG_FILE).write_text(json.dumps(mtp_config(run, scales, rows, dtype), indent=2))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0: exported; 2: refused (bad run, checkpoint, model or --out), nothing written."""
    return cli.run_main(_main, argv, errors=(ExportError, CheckpointError))


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtp_jax.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True, type=absolute, help="save_dir of a `python -m mtp_jax.train` run")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--out", required=True, type=absolute, help="output directory (created; must be empty unless --overwrite)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    out = export(args.run_dir, args.out, args.step, args.dtype, args.overwrite)
    log(f"wrote {out} (peak host RSS {peak_rss_mib():.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
