"""Gradients are summed in float32 whatever the trainables' dtype: over anchor chunks (objective.loss_and_grads)
and over micro-batches (train.step.accumulate), and cast back to the trainables' dtype once, at the end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mtp import build, make_batch
from mtp_jax.models import load_model
from mtp_jax.mtp import objective
from mtp_jax.mtp.model import MTPConfig
from mtp_jax.mtp.objective import loss_and_grads, split_params
from mtp_jax.train import step as train_step_module


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from conftest import make_hf_model, save_hf

    path = save_hf(make_hf_model("llama", seed=3), tmp_path_factory.mktemp("llama"))
    _, base, config = load_model(path)
    return config, base


def bf16_trainables(llama, mtp):
    """(model, bf16 trainable tree, frozen) with float32 compute: each chunk's gradient is its float32
    gradient rounded to bf16 (the cotangent of a bf16 param), so only the summation differs between a bf16
    and a float32 carry."""
    model, params = build(llama, mtp)
    trainable, frozen = split_params(model, params)
    return model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), trainable), frozen


def recording(monkeypatch, module, name, wrap):
    """Patches `module.name` with `wrap(original, record)`; returns the list `record` appends to, on the host,
    from inside the compiled loops (jax.debug.callback)."""
    seen, original = [], getattr(module, name)

    def record(tree):
        seen.append(jax.tree.map(lambda x: np.asarray(x, np.float64), tree))

    monkeypatch.setattr(module, name, wrap(original, record))
    return seen


def assert_within_bf16_rounding(ours, ref, scale, what):
    """Each element of `ours` (bf16) is `ref` (float64) rounded to bf16, up to the rounding of its terms: half a
    bf16 unit in the last place of `ref`, plus 2^-8 of `scale` (the sum of the terms' magnitudes over the same
    divisor). The terms were recorded rounded to bf16 (2^-9 of each), while XLA may add them to the float32
    sum unrounded (it allows excess precision); float32's own rounding of the sum is far below (n 2^-24).
    A bf16 running sum errs by half a unit of each partial sum at each addition: where the terms share a
    sign, about sqrt(n) 2^-9 of the whole sum, 3 to 4 times this bound at n = 149."""
    for (path, a), b, m in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(ref),
                               jax.tree.leaves(scale)):
        assert a.dtype == jnp.bfloat16, f"{what}: {jax.tree_util.keystr(path)} came back as {a.dtype}"
        half_ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(b), 1e-30))) - 8)
        worst = float(np.max(np.abs(np.asarray(a, np.float64) - b) / (half_ulp + 2.0 ** -8 * m + 1e-30)))
        assert worst <= 1.0, f"{what}: {jax.tree_util.keystr(path)} off by {worst:.2f} x the rounding bound"


def test_chunk_gradients_are_summed_in_float32(monkeypatch, llama):
    """bf16 trainables, one example with 149 anchors (its last token has no pair) in chunks of one:
    loss_and_grads' gradient is the float64 sum of the 149 chunk gradients it computed (recorded as the loop
    runs), divided by the pair count, rounded to bf16 once. A bf16 carry keeps 8 bits at each addition: past
    2^8 times a chunk's part the sum stops moving, and long before that its rounding errors add up."""
    model, trainable, frozen = bf16_trainables(llama, MTPConfig(draft_length=2, chunk_size=1))
    batch, _ = make_batch([(4, 150)], rows=1, length=160)

    def wrap(value_and_grad, record):
        def patched(fn, **kw):
            inner = value_and_grad(fn, **kw)

            def run(*args):
                out = inner(*args)
                jax.debug.callback(record, out[1])
                return out
            return run
        return patched

    seen = recording(monkeypatch, objective.jax, "value_and_grad", wrap)
    _, grads, sums = jax.jit(functools.partial(loss_and_grads, model))(trainable, frozen, batch)
    jax.block_until_ready(grads)
    monkeypatch.undo()
    pairs = float(sum(sums[f"step_{j}"]["count"] for j in (1, 2)))
    assert len(seen) == 149, f"{len(seen)} chunks ran, not 149"
    ref = jax.tree.map(lambda *g: np.sum(np.stack(g), axis=0) / pairs, *seen)
    scale = jax.tree.map(lambda *g: np.sum(np.abs(np.stack(g)), axis=0) / pairs, *seen)
    assert_within_bf16_rounding(grads, ref, scale, "chunk sum")


def test_micro_batch_gradients_are_summed_in_float32(monkeypatch, llama):
    """bf16 trainables, 24 micro-batches: accumulate's gradient is the float64 pair-weighted mean of the
    micro-batches' gradients, rounded to bf16 once (SPEC §5: n micro-batches give the step of one batch
    holding them all)."""
    model, trainable, frozen = bf16_trainables(llama, MTPConfig(draft_length=2, chunk_size=8))
    batches = [make_batch([(3, 9 + i % 5), (2, 6)], rows=1, length=24, seed=i)[0] for i in range(24)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)

    def wrap(original, record):
        def patched(model, trainable, frozen, batch, rng=None):
            loss, grads, sums = original(model, trainable, frozen, batch, rng)
            pairs = sum(sums[f"step_{j}"]["count"] for j in (1, 2))
            jax.debug.callback(record, (grads, pairs))
            return loss, grads, sums
        return patched

    seen = recording(monkeypatch, train_step_module, "loss_and_grads", wrap)
    _, grads, _, bad = jax.jit(functools.partial(train_step_module.accumulate, model))(
        trainable, frozen, stacked, jax.random.key(0))
    jax.block_until_ready(grads)
    monkeypatch.undo()
    assert int(bad) == 0 and len(seen) == 24, (int(bad), len(seen))
    weight = sum(float(p) for _, p in seen)
    grads_seen = [g for g, _ in seen]
    ref = jax.tree.map(lambda *g: sum(x * float(p) for x, (_, p) in zip(g, seen)) / weight, *grads_seen)
    scale = jax.tree.map(lambda *g: sum(np.abs(x) * float(p) for x, (_, p) in zip(g, seen)) / weight, *grads_seen)
    assert_within_bf16_rounding(grads, ref, scale, "micro-batch sum")
