"""The pure training step: `train_step(model, tx, schedule, state, frozen, batch) -> (state, metrics)`.

`batch` holds the optimizer step's micro-batches stacked on a leading axis ([micro, rows, length]);
they are accumulated inside the jitted step, so the state (and a checkpoint) is always at an
optimizer-step boundary. The optimizer (AdamW with warmup and cosine decay, global-norm clipping)
sees only the trainable tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtp_jax.mtp.objective import loss_and_grads, metrics_from_sums
from mtp_jax.train.config import OptimConfig


def _pairs(sums: dict, k: int) -> jax.Array:
    return sum(sums[f"step_{j}"]["count"] for j in range(1, k + 1))


def _micro_batch(model, trainable, frozen, batch, rng):
    """(loss, grads, sown sums, valid pairs, finite) of one micro-batch; a non-finite loss or gradient
    leaves `finite` false."""
    loss, grads, sums = loss_and_grads(model, trainable, frozen, batch, rng if model.lora.dropout > 0 else None)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    return loss, grads, sums, _pairs(sums, model.mtp.draft_length), finite


def accumulate(model, trainable, frozen, batches: dict, rng):
    """(loss, grads, sums, non-finite micro-batches) over micro-batches [micro, rows, length]: the
    gradient is the pair-weighted mean over the finite micro-batches (SPEC §5: the sum over all valid
    pairs / their number, so n micro-batches give the step of one batch holding them all); a micro-batch
    whose loss or gradient is not finite adds nothing to it. Loss and sums cover every micro-batch."""
    n = jax.tree.leaves(batches)[0].shape[0]
    if n == 1:
        loss, grads, sums, _, finite = _micro_batch(model, trainable, frozen, jax.tree.map(lambda x: x[0], batches),
                                                    rng)
        return loss, grads, sums, (~finite).astype(jnp.int32)

    def body(carry, xs):
        index, batch = xs
        loss, grads, sums, pairs, finite = _micro_batch(model, trainable, frozen, batch, jax.random.fold_in(rng, index))
        weight = jnp.where(finite, pairs, 0.0)
        summed = jax.tree.map(lambda g: jnp.where(finite, g.astype(jnp.float32) * weight, 0.0), grads)
        step = {"grads": summed, "weight": weight,
                "loss": loss * pairs, "pairs": pairs, "sums": sums, "bad": (~finite).astype(jnp.int32)}
        return jax.tree.map(jnp.add, carry, step), None

    first = jax.eval_shape(lambda b: _micro_batch(model, trainable, frozen, b, rng),
                           jax.tree.map(lambda x: x[0], batches))
    zero = {"grads": jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), first[1]), "weight": jnp.float32(0),
            "loss": jnp.float32(0), "pairs": jnp.float32(0),
            "sums": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first[2]), "bad": jnp.int32(0)}
    total, _ = jax.lax.scan(body, zero, (jnp.arange(n), batches))
    # summed in float32 (above) whatever the trainables' dtype; cast back once
    grads = jax.tree.map(lambda g, s: (g / jnp.maximum(total["weight"], 1.0)).astype(s.dtype), total["grads"],
                         first[1])
    return total["loss"] / jnp.maximum(total["pairs"], 1.0), grads, total["sums"], total["bad"]


def train_step(model, tx, schedule, state: dict, frozen: dict, batch: dict):
    """One optimizer step over the micro-batches of `batch`: the AdamW update of their accumulated gradient.

    Non-finite: an update with no finite micro-batch, or one that would make a param non-finite, is
    dropped (params and optimizer state stay as they were); non-finite micro-batches and a dropped
    overflow count in `skipped` and set the `nonfinite` metric, so no NaN ever enters the state.
    """
    rng = jax.random.fold_in(state["rng"], state["step"])
    loss, grads, sums, bad = accumulate(model, state["trainable"], frozen, batch, rng)
    n = jax.tree.leaves(batch)[0].shape[0]
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    apply = bad < n
    overflow = apply & ~all_finite(trainable)
    apply = apply & ~overflow

    def keep(new, old):  # dtypes as they came in (bf16 params: adam's moments would turn fp32 with fp32 grads)
        return jax.tree.map(lambda a, b: jnp.where(apply, a.astype(b.dtype), b), new, old)

    skipped = state["skipped"] + bad + overflow.astype(jnp.int32)
    new_state = {"step": state["step"] + 1, "rng": state["rng"], "trainable": keep(trainable, state["trainable"]),
                 "opt_state": keep(opt_state, state["opt_state"]), "skipped": skipped}
    metrics = metrics_from_sums(sums, model.mtp.draft_length)
    metrics.update({"loss/total": loss, "pairs": _pairs(sums, model.mtp.draft_length), "grad_norm": grad_norm,
                    "lr": schedule(state["step"]), "skipped": skipped, "nonfinite": (bad > 0) | overflow})
    return new_state, metrics


def all_finite(tree) -> jax.Array:
    """Scalar bool: every float leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def decay_mask(trainable):
    """AdamW decays matrices and LoRA biases, not RMSNorm weights (sampler norm1/norm2) nor the <mask> row."""
    def decays(path, _):
        keys = [getattr(k, "key", str(k)) for k in path]
        return not (keys[0] == "mask_embedding" or any("norm" in str(k) for k in keys))

    return jax.tree_util.tree_map_with_path(decays, trainable)


def make_optimizer(cfg: OptimConfig, max_steps: int):
    """(optax transformation, learning-rate schedule over optimizer steps)."""
    warmup = optax.linear_schedule(0.01 * cfg.lr, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(max_steps - cfg.warmup_steps, 1), alpha=cfg.min_lr_ratio)
    else:
        main = optax.constant_schedule(cfg.lr)
    schedule = optax.join_schedules([warmup, main], [cfg.warmup_steps]) if cfg.warmup_steps else main
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    # moments: optax's adamw (mu_dtype None) makes them like the params, the trainables' dtype, and
    # train_step's `keep` holds them there
    parts.append(optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def stack_micro_batches(hosts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Host micro-batches -> one batch [micro, rows, length], each padded to the longest (zeros: segment 0,
    positions no valid pair reads)."""
    length = max(h["tokens"].shape[1] for h in hosts)
    return {key: np.stack([np.pad(h[key], [(0, 0), (0, length - h[key].shape[1])]) for h in hosts])
            for key in hosts[0]}
