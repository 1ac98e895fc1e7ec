"""The MTP objective: regular stream once, mask stream in anchor chunks, exact gradients.

`loss_and_grads(model, trainable, frozen, batch)` equals the unchunked step for any chunk size:
every valid (anchor, step) pair counts wherever its teacher lies, and the sum is divided by the
batch's total number of valid pairs (SPEC §6), not averaged per chunk as MTP-GLoRA does.
Parameters are a flat dict {'base', 'lora', 'sampler', 'mask_embedding'}; `split_params` puts the
trainable leaves (adapters, sampler, optionally the mask row) on one side.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.models.llama import stack_layers, unstack_layers
from mtp_jax.mtp.layout import pair_valid
from mtp_jax.mtp.model import MTPModel

Params = dict[str, Any]


def trainable_keys(model: MTPModel) -> tuple[str, ...]:
    keys = ("lora", "sampler")
    return keys + ("mask_embedding",) if model.mtp.train_mask_embedding else keys


def split_params(model: MTPModel, params: Params) -> tuple[Params, Params]:
    keys = trainable_keys(model)
    return {k: v for k, v in params.items() if k in keys}, {k: v for k, v in params.items() if k not in keys}


def variables(params: Params) -> dict:
    return {"params": {"base": params["base"], "sampler": params["sampler"]}, "lora": {"base": params["lora"]}}


def init_args(model: MTPModel, mask_row) -> tuple:
    """Dummy `MTPModel.__call__` arguments (one row, two anchors) to initialise or shape its variables."""
    k, d, c = model.mtp.draft_length, model.config.hidden_size, model.config
    kv = (jnp.zeros((c.num_layers, 1, 2, c.num_kv_heads, c.head_dim), model.dtype),) * 2  # regular (k, v)
    teacher = jnp.zeros((1, 2 + k, d) if model.attention.shared_teacher else (1, 2, k + 1, d), model.dtype)
    return (jnp.asarray(mask_row), jnp.arange(2), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), kv,
            teacher, jnp.ones((1, 2, k), bool), jnp.zeros((1, 2, k), jnp.int32))


def stored_layout(model: MTPModel) -> MTPModel:
    """`model` with its layers stacked (scanned): the layout params are initialised, checkpointed, exported
    and decoded in, whatever `mtp.scan_layers` the training step runs with (`training_layout`)."""
    return model if model.mtp.scan_layers else model.clone(mtp=dataclasses.replace(model.mtp, scan_layers=True))


def init_params(model: MTPModel, base_params, mask_row: jax.Array, rng: jax.Array) -> Params:
    """Fresh adapters (A Kaiming-uniform, B = 0) and sampler beside the given base params, in the
    stacked layout (`stored_layout`), in `model.param_dtype` (the trainables' dtype; so is a trained
    `<mask>` row, a frozen one stays float32).

    The init runs under jit and returns only the small trainable trees, so XLA drops the
    base-model initialisation (an 8B random init never materialises).
    """
    model = stored_layout(model)
    args = init_args(model, mask_row)

    def init(r):
        v = nn.unbox(model.init(r, *args))
        return v["lora"]["base"], v["params"]["sampler"]

    lora, sampler = jax.jit(init)(rng)
    row_dtype = model.param_dtype if model.mtp.train_mask_embedding else jnp.float32  # trained: a trainable
    return {"base": base_params, "lora": lora, "sampler": sampler, "mask_embedding": jnp.asarray(mask_row, row_dtype)}


def training_layout(model: MTPModel, params: Params) -> Params:
    """`params` ('base' and 'lora', where present) in the layout `model`'s layers read: as they are
    (stacked) under the scan; with `mtp.scan_layers` off, per layer (`unstack_layers`). Checkpoints,
    export and decoding keep the stacked layout; the training step converts once per step (its
    trainable tree; the frozen base once per run, before the step)."""
    if model.mtp.scan_layers:
        return params
    n = model.config.num_layers
    return {key: unstack_layers(v, n) if key in ("base", "lora") else v for key, v in params.items()}


def regular_stream(model: MTPModel, params: Params, batch: dict):
    """Base hidden states and K/V of the regular tokens (no gradient); `params` in `training_layout`."""
    hidden, kv = model.apply(variables(params), batch["tokens"], batch["positions"], batch["segment_ids"],
                             method=MTPModel.regular)
    return jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(kv)


def _chunks(model: MTPModel, batch: dict):
    """Anchor-chunked views of the batch: the chunk size and the tail chunk's (0: none), the fullest
    row's count of anchors with a valid pair, the validity of every (anchor, step) pair, and the
    per-anchor arrays, each row's anchors with a valid pair first (in position order), so that prompt
    tokens, padding and the last token of each example cost nothing once chunks past the fullest
    row's count are skipped. Teacher hidden states are gathered per chunk (`rows_ahead`), never for all
    anchors at once ([b, length, k+1, hidden]: 5 GB in bf16 for Qwen3-8B, k = 4, at 128k tokens)."""
    k = model.mtp.draft_length
    b, length = batch["tokens"].shape
    c = model.mtp.chunk_size or length
    c = min(c, length)
    tail = model.mtp.tail_chunk if model.mtp.tail_chunk < c else 0
    padded = -(-length // c) * c
    if tail:  # the tail chunks end at the anchor count rounded up to `tail`, past n * c if c was cut to the row
        padded = max(padded, -(-length // tail) * tail)
    valid = pair_valid(batch["segment_ids"], batch["response_mask"].astype(bool), k)
    has_pair = valid[..., 0]  # a pair at step j > 1 implies one at step 1
    order = jnp.argsort(~has_pair, axis=1, stable=True)
    # past the end: index `length` + i, an anchor that sees nothing and whose pairs are all invalid
    order = jnp.concatenate([order, jnp.broadcast_to(length + jnp.arange(padded - length), (b, padded - length))], 1)
    anchors = jnp.max(jnp.sum(has_pair, axis=1))

    def gather(x):  # [b, length, ...] -> [b, padded, ...] in anchor order (zeros past the end)
        return rows_ahead(x, order, range(1))[:, :, 0]

    per_anchor = {
        "anchor_index": order,
        "positions": gather(batch["positions"]),
        "valid": gather(valid),
        "real_next": rows_ahead(batch["tokens"], order, range(1, k + 1)),
    }
    return c, tail, anchors, valid, per_anchor


def rows_ahead(x: jax.Array, anchor_index: jax.Array, steps: range) -> jax.Array:
    """x [b, length, ...] at a + j for j in `steps` of each anchor [b, c] -> [b, c, len(steps), ...];
    zeros past the row (padding anchors sit at index >= length)."""
    b, c = anchor_index.shape
    idx = (anchor_index[..., None] + jnp.asarray(steps)).reshape((b, c * len(steps)) + (1,) * (x.ndim - 2))
    rows = jnp.take_along_axis(x, idx, axis=1, mode="fill", fill_value=0)
    return rows.reshape((b, c, len(steps)) + x.shape[2:])


def loss_and_grads(model: MTPModel, trainable: Params, frozen: Params, batch: dict,
                   rng: jax.Array | None = None):
    """(loss, grads wrt `trainable`, sown sums) for one batch, chunked over anchors.

    `trainable` comes stacked, as the train state holds it (with `mtp.scan_layers` off it is put per layer
    here and its gradients stacked back); `frozen` comes in `training_layout` already (converted once per
    run, not per step)."""
    if not model.mtp.scan_layers and "layers" in frozen["base"]["model"]:
        raise ValueError("loss_and_grads: with mtp.scan_layers off the frozen base must come per layer; "
                         "pass training_layout(model, frozen)")
    trainable = training_layout(model, trainable)  # grads per layer, restacked at the end
    params = {**frozen, **trainable}
    hidden, kv = regular_stream(model, params, batch)
    c, tail, anchors, valid, per_anchor = _chunks(model, batch)
    n_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    deterministic = rng is None or model.lora.dropout == 0.0

    def chunk_loss(train, start, size, chunk_rng):
        p = {**frozen, **train}
        sl = {key: jax.lax.dynamic_slice_in_dim(v, start, size, axis=1) for key, v in per_anchor.items()}
        rngs = {"dropout": chunk_rng} if not deterministic else {}
        k = model.mtp.draft_length
        if model.attention.shared_teacher:  # the rows first .. first + size + k - 1 holding every teacher
            teacher = rows_ahead(hidden, sl["anchor_index"][:, :1], range(size + k))[:, 0]
        else:
            teacher = rows_ahead(hidden, sl["anchor_index"], range(k + 1))
        total, sown = model.apply(
            variables(p), p["mask_embedding"], sl["anchor_index"], sl["positions"], batch["segment_ids"], kv,
            teacher, sl["valid"], sl["real_next"],
            deterministic=deterministic,
            mutable=["mtp_losses"], rngs=rngs)
        return total, sown["mtp_losses"]

    def summed(total, sown):  # each sown value is a tuple of the layers' or steps' sums
        return total, {name: jax.tree.map(lambda *xs: sum(xs), *vals) for name, vals in sown.items()}

    grad_fn = jax.value_and_grad(chunk_loss, has_aux=True)

    def chunk(index, start, size):  # the index-th chunk: anchors start .. start + size - 1
        chunk_rng = jax.random.fold_in(rng, index) if rng is not None else jax.random.key(0)
        (total, sown), g = grad_fn(trainable, start, size, chunk_rng)
        total, sown = summed(total, sown)
        return total, g, sown

    # The loop's zero carry. The loss and sums take their shapes from the forward alone: tracing the
    # backward for them too made up some 40% of the step's trace. The gradients have the trainables' shapes
    # and are summed in float32 whatever the trainables' dtype: a bf16 running sum over many chunks rounds
    # each addition to the sum's 8 bits and stalls once a chunk's part falls below half its last bit; cast
    # back once, after the division.
    total_shape, sums_shape = jax.eval_shape(lambda: summed(*chunk_loss(trainable, 0, c, jax.random.key(0))))
    zeros = functools.partial(jax.tree.map, lambda s: jnp.zeros(s.shape, s.dtype))
    zero = (zeros(total_shape), jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), trainable), zeros(sums_shape))

    def add(carry, out):
        return jax.tree.map(lambda total, x: total + x.astype(total.dtype), carry, out)

    # Only chunks up to the fullest row's last anchor with a valid pair run; the loop stops there. (Not a
    # loop over all chunks with a lax.cond skipping the empty ones: that puts collectives inside the cond,
    # and on XLA:CPU's emulated multi-device meshes the devices can reach those and the ones outside it in
    # different orders, a deadlock.) With a tail chunk, what the full chunks leave runs in chunks of `tail`:
    # a second compiled body, for less padding (the last chunk pads fewer than `tail` anchor slots, not up
    # to chunk_size - 1).
    full = anchors // c if tail else -(-anchors // c)
    carry = jax.lax.fori_loop(0, full, lambda i, carry: add(carry, chunk(i, i * c, c)), zero)
    if tail:
        tails = -(-(anchors - full * c) // tail)
        carry = jax.lax.fori_loop(0, tails, lambda i, carry: add(carry, chunk(full + i, full * c + i * tail, tail)),
                                  carry)
    loss_sum, grads, sums = carry
    grads = jax.tree.map(lambda g, t: (g / n_valid).astype(t.dtype), grads, trainable)
    if not model.mtp.scan_layers:
        grads = {**grads, "lora": stack_layers(grads["lora"], model.config.num_layers)}
    return loss_sum / n_valid, grads, sums


def metrics_from_sums(sums: dict, k: int) -> dict[str, jax.Array]:
    """Flat metrics with stable keys: loss/step_j, acc/step_j, accept_len (tokens per step)."""
    out = {}
    for j in range(1, k + 1):
        s = sums[f"step_{j}"]
        count = jnp.maximum(s["count"], 1.0)
        out[f"loss/step_{j}"] = s["loss"] / count
        out[f"acc/step_{j}"] = s["agree"] / count
        if "lcm" in s:
            out[f"lcm/step_{j}"] = s["lcm"] / count
    acc = sums["accept"]
    out["accept_len"] = 1.0 + acc["accepted"] / jnp.maximum(acc["anchors"], 1.0)
    return out
