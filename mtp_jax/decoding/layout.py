"""The decode-time parameter layout, built once at load (`prepare`), never per call.

A decoding call reads every weight once. The training layout would have it copy them: its layers
are stacked ([layers, ...] leaves under `nn.scan`), and a scan slices each layer's weights out of
the stack, one device copy per weight per call. `prepare` therefore
- unstacks the layers (`scan_layers=False`, `unstack_layers`): straight-line code that reads each
  layer's weights in place;
- fuses the adapters (`lora.fuse_adapters`) and carries their A matrices in the base kernels that
  read the same inputs (`lora.adapters_into_base`): the same function with 4 adapter matmuls per
  layer instead of 14 (a batch-1 step is bound by its kernel count);
- casts every floating parameter to the compute dtype: each use casts to it anyway (same values),
  and float32 adapters under bf16 compute would otherwise cost cast kernels per layer per call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mtp_jax.models.llama import CausalLM, stack_layers, unstack_layers
from mtp_jax.models.lora import adapters_into_base, fuse_adapters
from mtp_jax.mtp.model import MTPModel


def is_prepared(model: CausalLM | MTPModel) -> bool:
    """Whether `model` is in the decoding layout (its params then are, if `prepare` built them)."""
    if (model.mtp if isinstance(model, MTPModel) else model).scan_layers:
        return False
    return not isinstance(model, MTPModel) or model.lora.rank == 0 or model.lora.a_in_base


def _cast(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x),
                        tree)


def prepare(model: CausalLM | MTPModel, params: Any) -> tuple[CausalLM | MTPModel, Any]:
    """(model, params) in the decoding layout (module docstring); a no-op on a model already in it.

    model: a CausalLM (params: its base tree, or {"params": tree}) or an MTPModel (params: the flat
    dict {base, lora, sampler, mask_embedding} of `mtp.objective.init_params` / `checkpoints.load_run`).
    Same outputs as the model given (the tests check the mask states against the training path); the
    returned leaves are new device arrays in the compute dtype, so the caller may drop the originals.
    """
    if is_prepared(model):
        return model, params
    n = model.config.num_layers
    stacked = lambda tree: tree if "layers" in tree["model"] else stack_layers(tree, n)
    if isinstance(model, MTPModel):
        lora_cfg, lora = fuse_adapters(model.lora, stacked(params["lora"]))
        lora_cfg, base, lora = adapters_into_base(lora_cfg, stacked(params["base"]), lora)
        params = {**params, "base": unstack_layers(base, n), "lora": unstack_layers(lora, n)}
        return (model.clone(lora=lora_cfg, mtp=dataclasses.replace(model.mtp, scan_layers=False)),
                _cast(params, model.dtype))
    if not isinstance(model, CausalLM):
        raise TypeError(f"prepare: expected a CausalLM or an MTPModel, got {type(model).__name__}")
    tree = params["params"] if "params" in params else params
    return model.clone(scan_layers=False), _cast(unstack_layers(tree, n), model.dtype)
