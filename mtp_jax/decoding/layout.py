"""The decode-time parameter layout, built once at load (`prepare`), never per call.

A decoding call reads every weight once. The training layout would have it copy them: its layers
are stacked ([layers, ...] leaves under `nn.scan`), and a scan slices each layer's weights out of
the stack, one device copy per weight per call. `prepare` therefore
- unstacks the layers (`scan_layers=False`, `unstack_layers`): straight-line code that reads each
  layer's weights in place;
- fuses the adapters (`lora.fuse_adapters`) and carries their A matrices in the base kernels that
  read the same inputs (`adapters_into_base`), run by the layer of `decoding.model` (`DecodeLayer`):
  the same function with 4 adapter matmuls per layer instead of 14 (a batch-1 step is bound by its
  kernel count);
- casts every floating parameter to the compute dtype: each use casts to it anyway (same values),
  and float32 adapters under bf16 compute would otherwise cost cast kernels per layer per call.

`prepare(merged=True)` instead multiplies each adapter out, s A B, into extra columns of its
projection's kernel (`merge_adapters`, run by `decoding.model.MergedDecodeLayer`): no adapter matmul
at all, one matmul per projection, for twice the adapted kernels' bytes. The drafts come from
x (s A B) instead of (x A)(s B), so they may differ in the last bits; the base rows, and so the
output, are the base model's either way. `prepare(merged=None)` picks it for small bases
(`small_base`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mtp_jax.decoding.model import DecodeLayer, MergedDecodeLayer
from mtp_jax.models.llama import CausalLM, stack_layers, unstack_layers
from mtp_jax.models.lora import FUSED_MODULES, LoRAConfig, fuse_adapters
from mtp_jax.mtp.model import MTPModel


# A base of at most this many parameters decodes in the merged layout by default (`prepare(merged=None)`), a
# larger one in A columns, drafting over a list of token ids where its run has one (`adapter.load_adapter`). A
# batch-1 call of a small model is bound by its kernel count (SmolLM2-135M: 1.92x over plain greedy merged,
# 1.72x in A columns, same adapter and run); an 8B model's by the bytes it reads, which the merged layout would
# nearly double and which scoring k drafts over the whole vocabulary raises by k reads of the output matrix
# (Qwen3-8B shapes: a layout-`0` call 1.38x a plain one, 1.21x over 32,768 ids). docs/decoding.md.
SMALL_BASE_PARAMS = 1_000_000_000


def small_base(base: Any) -> bool:
    """Whether the base parameter tree `base` (any layout) is small in the sense of `SMALL_BASE_PARAMS`."""
    return sum(x.size for x in jax.tree.leaves(base)) <= SMALL_BASE_PARAMS


def is_prepared(model: CausalLM | MTPModel) -> bool:
    """Whether `model` is in the decoding layout (its params then are, if `prepare` built them)."""
    if (model.mtp if isinstance(model, MTPModel) else model).scan_layers:
        return False
    return not isinstance(model, MTPModel) or model.layer in (DecodeLayer, MergedDecodeLayer)


def adapters_into_base(base: dict, lora: dict) -> tuple[dict, dict]:
    """(base, lora) trees (stacked or per layer) -> the same with every `lora_A` appended as columns
    to the base kernel that reads its input (a fused adapter's: its group's first projection; an
    unfused one's: its own), the lora collection keeping B (and bias): the parameters of
    `decoding.model.DecodeLayer`. A no-op on trees without a `lora_A` (already in this layout)."""
    if "lora_A" not in str(jax.tree_util.tree_structure(lora)):
        return base, lora
    hosts = {module: f"{group[0]}_proj" for group, (_, module) in FUSED_MODULES.items()}  # else its own projection
    base_model, lora_model = dict(base["model"]), dict(lora["model"])
    for layer, blocks in lora["model"].items():  # "layers" (stacked) or "layers_{i}"
        base_blocks = {block: dict(v) for block, v in base["model"][layer].items()}
        lora_blocks = {block: dict(v) for block, v in blocks.items()}
        for block, modules in blocks.items():  # iterate the input; the copies above change
            for module, adapter in modules.items():
                host = hosts.get(module, module)
                kernel = base_blocks[block][host]["kernel"]
                base_blocks[block][host] = {**base_blocks[block][host], "kernel": jnp.concatenate(
                    [kernel, adapter["lora_A"].astype(kernel.dtype)], -1)}
                lora_blocks[block][module] = {name: x for name, x in adapter.items() if name != "lora_A"}
        base_model[layer], lora_model[layer] = base_blocks, lora_blocks
    return {**base, "model": base_model}, {**lora, "model": lora_model}


def merge_adapters(cfg: LoRAConfig, base: dict, lora: dict) -> dict:
    """(base, lora) trees (stacked or per layer, fused adapters or not) -> the base tree with every adapted
    projection's kernel W replaced by [W | s A B] (s A B computed in float32): the parameters of
    `decoding.model.MergedDecodeLayer`. A fused adapter's s A B is split across its group's projections."""
    if cfg.bias:
        raise ValueError("merged decoding layout: adapters with a bias (lora.bias) are not supported")
    groups = {module: group for group, (_, module) in FUSED_MODULES.items()}
    base_model = dict(base["model"])
    for layer, blocks in lora["model"].items():  # "layers" (stacked) or "layers_{i}"
        base_blocks = {block: dict(v) for block, v in base["model"][layer].items()}
        for block, modules in blocks.items():
            for module, adapter in modules.items():
                a, b = (jnp.asarray(adapter[name], jnp.float32) for name in ("lora_A", "lora_B"))
                targets = cfg.group(groups[module]) if module in groups else (module.removesuffix("_proj"),)
                delta = (a @ b) * cfg.scale(len(targets))
                for target in targets:
                    proj = base_blocks[block][f"{target}_proj"]
                    kernel = proj["kernel"]
                    part, delta = delta[..., :kernel.shape[-1]], delta[..., kernel.shape[-1]:]
                    base_blocks[block][f"{target}_proj"] = {
                        **proj, "kernel": jnp.concatenate([kernel, part.astype(kernel.dtype)], -1)}
        base_model[layer] = base_blocks
    return {**base, "model": base_model}


def _cast(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x),
                        tree)


def layout_name(model: CausalLM | MTPModel) -> str:
    """Which layout `model` decodes in: "merged", "A columns" or "training" (not prepared)."""
    if not is_prepared(model):
        return "training"
    return "merged" if isinstance(model, MTPModel) and model.layer is MergedDecodeLayer else "A columns"


def prepare(model: CausalLM | MTPModel, params: Any, merged: bool | None = False
            ) -> tuple[CausalLM | MTPModel, Any]:
    """(model, params) in the decoding layout (module docstring; `merged`: the merged one, for an
    MTPModel; None: merged for a small base, `small_base`); a no-op on a model
    already in a decoding layout.

    model: a CausalLM (params: its base tree, or {"params": tree}) or an MTPModel (params: the flat
    dict {base, lora, sampler, mask_embedding} of `mtp.objective.init_params` / `checkpoints.load_run`).
    Same outputs as the model given (the tests check the mask states against the training path); the
    returned leaves are new device arrays in the compute dtype, so the caller may drop the originals.
    """
    if is_prepared(model):
        if merged and isinstance(model, MTPModel) and model.layer is not MergedDecodeLayer:
            raise ValueError("prepare(merged=True): the model is already in the A-columns decoding layout; prepare "
                             "the merged one from the training layout (the run's params)")
        return model, params
    if merged is None:
        merged = isinstance(model, MTPModel) and small_base(params["base"])
    n = model.config.num_layers
    stacked = lambda tree: tree if "layers" in tree["model"] else stack_layers(tree, n)
    if isinstance(model, MTPModel) and merged:
        base = merge_adapters(model.lora, stacked(params["base"]), stacked(params["lora"]))
        params = {**params, "base": unstack_layers(base, n), "lora": {}}
        mtp = dataclasses.replace(model.mtp, scan_layers=False)
        return (model.clone(lora=dataclasses.replace(model.lora, fuse=False), mtp=mtp, layer=MergedDecodeLayer),
                _cast(params, model.dtype))
    if isinstance(model, MTPModel):
        lora_cfg, lora = fuse_adapters(model.lora, stacked(params["lora"]))
        base, lora = adapters_into_base(stacked(params["base"]), lora)
        params = {**params, "base": unstack_layers(base, n), "lora": unstack_layers(lora, n)}
        return (model.clone(lora=lora_cfg, mtp=dataclasses.replace(model.mtp, scan_layers=False), layer=DecodeLayer),
                _cast(params, model.dtype))
    if not isinstance(model, CausalLM):
        raise TypeError(f"prepare: expected a CausalLM or an MTPModel, got {type(model).__name__}")
    tree = params["params"] if "params" in params else params
    if "layers" in tree["model"]:  # else per layer already: the base of a prepared MTPModel's params
        tree = unstack_layers(tree, n)
    return model.clone(scan_layers=False), _cast(tree, model.dtype)


def _without_a_columns(base: dict, config) -> dict:
    """A per-layer base tree of the decoding layout with the adapters' A columns (`adapters_into_base`)
    cut off its kernels again: the base model's own projections."""
    width = {"q_proj": config.q_features, "k_proj": config.kv_features, "v_proj": config.kv_features,
             "o_proj": config.hidden_size, "gate_proj": config.intermediate_size,
             "up_proj": config.intermediate_size, "down_proj": config.hidden_size}

    def cut(path, x):
        names = [getattr(key, "key", None) for key in path]
        proj = names[-2] if len(names) >= 2 and names[-1] == "kernel" else None
        return x[..., :width[proj]] if proj in width and x.shape[-1] > width[proj] else x

    return jax.tree_util.tree_map_with_path(cut, base)


def plain_of(model: MTPModel, params: Any) -> tuple[CausalLM, Any]:
    """(CausalLM, params) of plain decoding with `model`'s frozen base, in the decoding layout, from the
    MTPModel's params in either layout (`adapter.load_adapter` returns them prepared): the baseline
    speculative decoding is checked and timed against. Prepared params carry the adapters' A
    matrices in the base kernels; the plain model gets a copy of those kernels without them."""
    lm = CausalLM(model.config, None, model.dtype, model.param_dtype)
    base = _without_a_columns(params["base"], model.config) if is_prepared(model) else params["base"]
    return prepare(lm, base)
