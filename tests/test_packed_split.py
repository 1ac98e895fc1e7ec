"""mtp.prefix_split on packed rows (several examples per row): the split attention's parts per example equal
the dense prefix mask, and the whole objective equals the masked layout and the interleaved oracle."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.mtp.attention import segment_causal_mask
from mtp_jax.mtp.model import MTPConfig, MTPModel
from mtp_jax.mtp.objective import loss_and_grads, split_params
from mtp_jax.mtp.split_attention import (_softmax_attention, merge_lse, packed_chunk, packed_part_mask, packed_runs,
                                         packed_split_attention)
from test_mtp import assert_sums_close, assert_trees_close, build, oracle_loss, rel, setups  # noqa: F401

# rows of (prompt_len, response_len): 2-4 examples each, padding at the row end; (3, 2) is shorter than k = 3
ROWS = [[(3, 6), (2, 5), (4, 3)], [(2, 4), (1, 3), (3, 2), (2, 5)], [(5, 9)]]
LENGTH = 24


def packed_batch(rows, length, seed=0, vocab=150):
    """A batch of the given rows of examples, each row packed in order from its start (segments 1, 2, ..),
    zero-padded to `length`; returns (batch, token arrays in row-major order, (prompt, response) likewise)."""
    rng = np.random.default_rng(seed)
    batch = {key: np.zeros((len(rows), length), np.int32) for key in ("tokens", "positions", "segment_ids")}
    batch["response_mask"] = np.zeros((len(rows), length), bool)
    toks = []
    for r, row in enumerate(rows):
        col = 0
        for seg, (p, n) in enumerate(row, start=1):
            t = rng.integers(3, vocab, p + n)
            sl = slice(col, col + p + n)
            batch["tokens"][r, sl], batch["positions"][r, sl], batch["segment_ids"][r, sl] = t, np.arange(p + n), seg
            batch["response_mask"][r, col + p: col + p + n] = True
            toks.append(t)
            col += p + n
    return {key: jnp.asarray(v) for key, v in batch.items()}, toks, [ex for row in rows for ex in row]


def chunk_case(seed=0, c=7, heads=4, kv=2, d=8):
    """q, k, v, the extra part and a chunk of anchors of ROWS that straddles examples (row 1: anchors of
    segments 1-4; row 2: one example, then padding slots past the row)."""
    batch, _, _ = packed_batch(ROWS, LENGTH)
    anchors = jnp.asarray([[4, 5, 6, 7, 8, 11, 12], [3, 4, 5, 7, 8, 9, 13], [9, 10, 11, 12, 24, 25, 26]])[:, :c]
    keys = jax.random.split(jax.random.key(seed), 6)
    q, out_x = (jax.random.normal(kk, (3, c, heads, d)) for kk in keys[:2])
    k, v = (jax.random.normal(kk, (3, LENGTH, kv, d)) for kk in keys[2:4])
    lse_x = jax.random.normal(keys[4], (3, c, heads)) + 1.0
    return batch["segment_ids"], anchors, q, k, v, out_x, lse_x, jax.random.normal(keys[5], q.shape)


def naive_prefix(q, k, v, segment_ids, anchors, out_x, lse_x):
    """The prefix under the dense mask (keys <= anchor, same example) merged with the extra part."""
    o, s = _softmax_attention(q, k, v, segment_causal_mask(segment_ids, anchors))
    return merge_lse(o, s, out_x, lse_x)[0]


def test_packed_chunk_parts():
    """packed_chunk: each anchor's part A runs from its example's first token to the chunk's first anchor of
    that example; padding slots (index past the row) have segment 0 and see nothing."""
    segment_ids, anchors, *_ = chunk_case()
    chunk = packed_chunk(anchors, segment_ids)
    np.testing.assert_array_equal(chunk.segment[0], [1, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(chunk.kv_start[0], [0] * 5 + [9] * 2)
    np.testing.assert_array_equal(chunk.kv_end[0], [4] * 5 + [11] * 2)
    np.testing.assert_array_equal(chunk.segment[1], [1, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(chunk.kv_end[1], [3, 3, 3, 7, 7, 7, 13])
    np.testing.assert_array_equal(chunk.kv_start[1], [0, 0, 0, 6, 6, 6, 10])
    np.testing.assert_array_equal(chunk.segment[2], [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(chunk.kv_end[2] - chunk.kv_start[2], [9, 9, 9, 9, 0, 0, 0])


@pytest.mark.parametrize("c", [7, 4, 1])
def test_packed_split_attention_equals_dense_prefix_mask(c):
    """packed_split_attention on XLA (parts A and B from small masks, its own backward from the merged output
    and LSE) gives the dense prefix mask's output and the gradients wrt q and the extra part, for every slot
    with an anchor in the row, in chunks that straddle examples; padding slots see only the extra part."""
    segment_ids, anchors, q, k, v, out_x, lse_x, g = chunk_case(c=c)
    chunk = packed_chunk(anchors, segment_ids)

    def ours(q, ox, lx):
        return packed_split_attention(q, k, v, chunk, ox, lx, "xla")

    def ref(q, ox, lx):
        return naive_prefix(q, k, v, segment_ids, anchors, ox, lx)

    real = (anchors < LENGTH)[..., None, None]
    for f in (ours, ref):  # padding slots: compare only their extra-part gradient through the merge
        out, vjp = jax.vjp(f, q, out_x, lse_x)
        if f is ours:
            got = (jnp.where(real, out, 0), *vjp(jnp.where(real, g, 0)))
        else:
            want = (jnp.where(real, out, 0), *vjp(jnp.where(real, g, 0)))
    for name, a, b in zip(("out", "dq", "d_out_x", "d_lse_x"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    pad_out = ours(q, out_x, lse_x)[2, 4:]
    np.testing.assert_allclose(pad_out, out_x[2, 4:], rtol=1e-6)


def runs_mask(runs, t, keys, causal):
    """[b, 1, t, keys] bool: what cuDNN's packed runs let each query see (used runs only)."""
    q_len, q_off, kv_len, kv_off, _ = (np.asarray(x) for x in runs)
    mask = np.zeros((q_len.shape[0], 1, t, keys), bool)
    for b, m in zip(*np.nonzero(q_len > 0)):
        for i in range(q_len[b, m]):
            stop = min(kv_len[b, m], i + 1) if causal else kv_len[b, m]
            mask[b, 0, q_off[b, m] + i, kv_off[b, m]: kv_off[b, m] + stop] = True
    return mask


@pytest.mark.parametrize("causal", [False, True])
def test_packed_runs_are_the_part_masks(causal):
    """The runs handed to cuDNN (query and key offsets and lengths per example, -1 where unused) let each
    query see exactly what the XLA part's mask does; a chunk with more examples than runs overflows."""
    from mtp_jax.mtp.cudnn_private import segment_runs

    segment_ids, anchors, *_ = chunk_case()
    chunk = packed_chunk(anchors, segment_ids)
    keys = anchors.shape[1] if causal else LENGTH
    runs = packed_runs(chunk, causal, max_runs=4)
    np.testing.assert_array_equal(runs_mask(runs, anchors.shape[1], keys, causal),
                                  packed_part_mask(chunk, keys, causal))
    assert not np.any(runs[4])
    np.testing.assert_array_equal(packed_runs(chunk, causal, max_runs=2)[4], [False, True, False])
    regular = segment_runs(segment_ids, max_runs=4)
    np.testing.assert_array_equal(runs_mask(regular, LENGTH, LENGTH, True), segment_causal_mask(segment_ids))
    np.testing.assert_array_equal(segment_runs(segment_ids, max_runs=3)[4], [False, True, False])


@pytest.mark.parametrize("causal", [False, True])
def test_packed_key_ranges_are_the_part_masks(causal):
    """The key range per anchor slot that the Triton dq reads (start .. end - 1) is the XLA part's mask row."""
    from mtp_jax.mtp.split_attention import packed_key_range

    segment_ids, anchors, *_ = chunk_case()
    chunk = packed_chunk(anchors, segment_ids)
    keys = anchors.shape[1] if causal else LENGTH
    start, end = (np.asarray(x)[..., None] for x in packed_key_range(chunk, causal))
    key = np.arange(keys)
    np.testing.assert_array_equal((key >= start) & (key < end), packed_part_mask(chunk, keys, causal)[:, 0])


@pytest.mark.parametrize("kind,k,chunk,tail,remat", [
    ("llama", 1, 5, 0, "none"), ("qwen3", 2, 4, 2, "dots"), ("llama", 3, 7, 0, "dots"), ("qwen3", 4, 6, 3, "full"),
    ("llama", 3, 0, 0, "none")])
def test_packed_prefix_split_equals_masked_and_oracle(setups, kind, k, chunk, tail, remat):  # noqa: F811
    """On packed rows (2-4 examples of different prompt and response lengths, padding at the row end),
    mtp.prefix_split with mtp.packed gives the masked layout's loss, gradients and sown sums, and the
    interleaved oracle's loss and gradients (float32), for chunks that straddle examples, tail chunks,
    k = 1..4 and every remat."""
    model, params = build(setups[kind], MTPConfig(draft_length=k, soft_ce_impl="jnp"))
    split = MTPModel(model.config, model.lora, dataclasses.replace(
        model.mtp, chunk_size=chunk, tail_chunk=tail, prefix_split=True, packed=True, remat=remat))
    assert split.attention.split and not split.attention.shared_teacher
    batch, toks, examples = packed_batch(ROWS, LENGTH)
    trainable, frozen = split_params(model, params)
    loss, grads, sums = jax.jit(functools.partial(loss_and_grads, model))(trainable, frozen, batch)
    loss_s, grads_s, sums_s = jax.jit(functools.partial(loss_and_grads, split))(trainable, frozen, batch)
    assert abs(float(loss) - float(loss_s)) < 1e-6 * abs(float(loss)), (float(loss), float(loss_s))
    assert_trees_close(grads_s, grads, 1e-5, f"packed prefix_split chunk {chunk}")
    assert_sums_close(sums_s, sums)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(
        lambda t, f: oracle_loss(model, {**f, **t}, toks, examples, k)))(trainable, frozen)
    assert abs(float(loss_s) - float(ref_loss)) / abs(float(ref_loss)) < 1e-5, (float(loss_s), float(ref_loss))
    assert_trees_close(grads_s, ref_grads, 1e-5, f"packed prefix_split vs oracle, k={k}")


def test_unpacked_split_on_packed_rows_is_wrong(setups):  # noqa: F811
    """The one-example split (mtp.packed off) on packed rows differs from the masked layout: the packed
    tests above can fail, and packed rows need mtp.packed."""
    k = 3
    model, params = build(setups["llama"], MTPConfig(draft_length=k, soft_ce_impl="jnp"))
    split = MTPModel(model.config, model.lora, dataclasses.replace(model.mtp, chunk_size=7, prefix_split=True))
    batch, _, _ = packed_batch(ROWS, LENGTH)
    trainable, frozen = split_params(model, params)
    loss = jax.jit(functools.partial(loss_and_grads, model))(trainable, frozen, batch)[0]
    loss_s = jax.jit(functools.partial(loss_and_grads, split))(trainable, frozen, batch)[0]
    assert rel(loss_s, loss) > 1e-5  # the tests above hold to 1e-6


def test_rows_over_max_segments_are_refused_before_the_step():
    """The packed split on cuDNN has a static number of runs per row: a batch with a row of more examples
    is refused on the host with what to change; other plans take any number."""
    from mtp_jax.mtp.attention import AttentionPlan, check_packed_rows

    segment_ids = np.asarray([[1, 1, 2, 3, 3, 0], [1, 2, 3, 4, 5, 0]])
    plan = AttentionPlan(layout="split", impl="cudnn", packed=True, max_segments=4)
    with pytest.raises(ValueError, match=r"a row packs 5 examples, over mtp.max_segments \(4\)"):
        check_packed_rows(segment_ids, plan)
    check_packed_rows(segment_ids[:1], plan)
    for other in (dataclasses.replace(plan, impl="xla"), dataclasses.replace(plan, packed=False), AttentionPlan()):
        check_packed_rows(segment_ids, other)
