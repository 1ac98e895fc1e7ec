"""The two-stream MTP objective is the naive interleaved computation (SPEC §2-§6)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.models import LoRAConfig, load_model
from mtp_jax.models.llama import CausalLM
from mtp_jax.mtp.mask_token import mask_embedding
from mtp_jax.mtp.model import MTPConfig, MTPModel
from mtp_jax.mtp.objective import init_params, loss_and_grads, metrics_from_sums, split_params
from mtp_oracle import oracle_loss_sum

LORA = LoRAConfig(rank=4, alpha=8.0)
EXAMPLES = [  # (prompt_len, response_len): uneven, one response shorter than k
    (5, 9), (3, 4), (2, 6), (4, 2),
]


def make_batch(examples, rows, length, seed=0, vocab=150):
    """Packs examples into `rows` rows of `length` (greedy, in order) with padding; returns batch + tokens."""
    rng = np.random.default_rng(seed)
    toks = [rng.integers(3, vocab, p + r) for p, r in examples]
    batch = {key: np.zeros((rows, length), np.int32) for key in ("tokens", "positions", "segment_ids")}
    batch["response_mask"] = np.zeros((rows, length), bool)
    row, col, seg = 0, 0, 0
    for (p, r), t in zip(examples, toks):
        if col + len(t) > length:
            row, col, seg = row + 1, 0, 0
        seg += 1
        sl = slice(col, col + len(t))
        batch["tokens"][row, sl] = t
        batch["positions"][row, sl] = np.arange(len(t))
        batch["segment_ids"][row, sl] = seg
        batch["response_mask"][row, col + p: col + len(t)] = True
        col += len(t)
    return {k: jnp.asarray(v) for k, v in batch.items()}, toks


def one_example_per_row(examples, length):
    """A batch with each example alone in its row (as with data.packing off)."""
    rows = [make_batch([ex], rows=1, length=length, seed=i)[0] for i, ex in enumerate(examples)]
    return {key: jnp.concatenate([r[key] for r in rows]) for key in rows[0]}


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    from conftest import make_hf_model, save_hf

    out = {}
    for kind in ("llama", "qwen3"):
        path = save_hf(make_hf_model(kind, seed=3), tmp_path_factory.mktemp(kind))
        _, base, config = load_model(path)
        out[kind] = (config, base)
    return out


def build(setup, mtp: MTPConfig, lora=LORA, seed=0):
    config, base = setup
    model = MTPModel(config, lora, mtp)
    row = mask_embedding(base["model"]["embed_tokens"]["embedding"], config.vocab_size)
    params = init_params(model, base, row, jax.random.key(seed))
    # B = 0 at init would make the adapters invisible: give them values
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    params["lora"] = jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), params["lora"])
    return model, params


def oracle_loss(model, params, toks, examples, k, **kw):
    lm = CausalLM(model.config, model.lora)
    from mtp_jax.models.sampler import SamplerHead

    sampler = SamplerHead(model.config.hidden_size, model.config.rms_norm_eps)
    total, count, _ = oracle_loss_sum(lm, sampler, params, [(t, p) for t, (p, _) in zip(toks, examples)], k, **kw)
    return total / count


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def assert_trees_close(ours, ref, tol, what):
    flat_o = jax.tree_util.tree_flatten_with_path(ours)[0]
    flat_r = jax.tree.leaves(ref)
    for (path, a), b in zip(flat_o, flat_r):
        r = rel(a, b)
        assert r < tol, f"{what}: {jax.tree_util.keystr(path)} rel diff {r:.2e}"


def assert_sums_close(ours, ref):
    """Every sown sum (per-step loss, count, agreement; acceptance) within 1e-5."""
    for key in ref:
        for field in ref[key]:
            np.testing.assert_allclose(ours[key][field], ref[key][field], rtol=1e-5, err_msg=f"{key}/{field}")


@pytest.mark.parametrize("kind,k", [("llama", 1), ("qwen3", 3), ("llama", 4)])
def test_two_stream_equals_interleaved_oracle(setups, kind, k):
    model, params = build(setups[kind], MTPConfig(draft_length=k, soft_ce_impl="jnp"))
    batch, toks = make_batch(EXAMPLES, rows=3, length=16)
    trainable, frozen = split_params(model, params)
    loss, grads, _ = jax.jit(functools.partial(loss_and_grads, model))(trainable, frozen, batch)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(
        lambda t, f: oracle_loss(model, {**f, **t}, toks, EXAMPLES, k)))(trainable, frozen)
    assert abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)) < 1e-5, (float(loss), float(ref_loss))
    assert_trees_close(grads, ref_grads, 1e-5, f"{kind} k={k} grads")


@pytest.mark.parametrize("option", ["teacher_forcing", "lcm", "train_mask_embedding"])
def test_options_match_oracle(setups, option):
    k = 3
    mtp = MTPConfig(draft_length=k, soft_ce_impl="jnp", teacher_forcing=option == "teacher_forcing",
                    lcm_weight=0.5 if option == "lcm" else 0.0, train_mask_embedding=option == "train_mask_embedding")
    model, params = build(setups["llama"], mtp)
    batch, toks = make_batch(EXAMPLES, rows=3, length=16)
    trainable, frozen = split_params(model, params)
    assert ("mask_embedding" in trainable) == (option == "train_mask_embedding")
    loss, grads, _ = jax.jit(functools.partial(loss_and_grads, model))(trainable, frozen, batch)
    kw = dict(teacher_forcing=mtp.teacher_forcing, lcm_weight=mtp.lcm_weight)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(
        lambda t, f: oracle_loss(model, {**f, **t}, toks, EXAMPLES, k, **kw)))(trainable, frozen)
    assert abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)) < 1e-5
    assert_trees_close(grads, ref_grads, 1e-5, option)


@pytest.mark.parametrize("chunk,tail,remat", [(1, 0, "dots"), (5, 0, "full"), (5, 0, "none"), (6, 2, "dots"),
                                              (24, 6, "none")])
def test_chunked_equals_unchunked(setups, chunk, tail, remat):
    """Anchor chunks (C = 1, and 5 not dividing 16), tail chunks (2 after a chunk of 6; 6 after a single
    chunk cut to the row's 16, which 6 does not divide) and per-layer remat change nothing."""
    k = 3
    model, params = build(setups["qwen3"], MTPConfig(draft_length=k, soft_ce_impl="jnp"))
    chunked = MTPModel(model.config, model.lora, dataclasses.replace(
        model.mtp, chunk_size=chunk, tail_chunk=tail, row_chunk=4, remat=remat))
    batch, _ = make_batch(EXAMPLES, rows=3, length=16)
    trainable, frozen = split_params(model, params)
    loss, grads, sums = jax.jit(functools.partial(loss_and_grads, model))(trainable, frozen, batch)
    loss_c, grads_c, sums_c = jax.jit(functools.partial(loss_and_grads, chunked))(trainable, frozen, batch)
    assert abs(float(loss) - float(loss_c)) < 1e-6 * abs(float(loss))
    assert_trees_close(grads_c, grads, 1e-5, f"chunk {chunk}")
    assert_sums_close(sums_c, sums)


@pytest.mark.parametrize("chunk,tail,remat", [(3, 0, "dots"), (16, 0, "none"), (6, 2, "dots")])
def test_prefix_split_equals_masked_on_one_example_per_row(setups, chunk, tail, remat):
    """mtp.prefix_split (no prefix mask: keys before the chunk + its causal diagonal block, its backward
    run from the merged output and LSE) gives the masked objective's loss and gradients when every row
    holds one example, for chunks that start, span and end the anchors (tail chunks too), with and
    without remat."""
    k = 3
    model, params = build(setups["llama"], MTPConfig(draft_length=k, soft_ce_impl="jnp"))
    split = MTPModel(model.config, model.lora, dataclasses.replace(model.mtp, chunk_size=chunk, tail_chunk=tail,
                                                                   prefix_split=True, remat=remat))
    batch = one_example_per_row(EXAMPLES, length=16)
    trainable, frozen = split_params(model, params)
    loss, grads, sums = jax.jit(functools.partial(loss_and_grads, model))(trainable, frozen, batch)
    loss_s, grads_s, sums_s = jax.jit(functools.partial(loss_and_grads, split))(trainable, frozen, batch)
    assert abs(float(loss) - float(loss_s)) < 1e-6 * abs(float(loss)), (float(loss), float(loss_s))
    assert_trees_close(grads_s, grads, 1e-5, f"prefix_split chunk {chunk}")
    assert_sums_close(sums_s, sums)  # agreement and acceptance read the teacher's argmaxes (one logits block here)


@pytest.mark.parametrize("split,chunk,remat", [(True, 3, "dots"), (False, 5, "full")])
def test_layer_loop_equals_scan(setups, split, chunk, remat):
    """mtp.scan_layers off (the layers as straight-line code) gives the scanned step's loss and gradients,
    the latter in the stacked layout of the trainable tree, from the frozen base in the training layout
    (converted once; a stacked one is refused); and what enters the anchor-chunk loop is each layer's own
    weights, never the stacked ones a scan would slice a copy from for every chunk."""
    from mtp_jax.models.llama import stack_layers
    from mtp_jax.mtp.objective import training_layout

    mtp = MTPConfig(draft_length=3, soft_ce_impl="jnp", chunk_size=chunk, prefix_split=split, remat=remat)
    model, params = build(setups["qwen3"], mtp)
    loop = MTPModel(model.config, model.lora, dataclasses.replace(mtp, scan_layers=False))
    batch = one_example_per_row(EXAMPLES, length=16) if split else make_batch(EXAMPLES, rows=3, length=16)[0]
    trainable, frozen = split_params(model, params)
    n = model.config.num_layers
    unstacked = training_layout(loop, frozen)
    assert training_layout(model, frozen) is frozen
    assert jax.tree.all(jax.tree.map(jnp.array_equal, stack_layers(unstacked["base"], n), frozen["base"]))
    loss, grads, _ = jax.jit(functools.partial(loss_and_grads, model))(trainable, frozen, batch)
    loss_l, grads_l, _ = jax.jit(functools.partial(loss_and_grads, loop))(trainable, unstacked, batch)
    assert float(loss_l) == pytest.approx(float(loss), rel=1e-6)
    assert jax.tree.structure(grads_l) == jax.tree.structure(grads)
    assert_trees_close(grads_l, grads, 1e-5, "layer loop")
    with pytest.raises(ValueError, match="training_layout"):
        loss_and_grads(loop, trainable, frozen, batch)

    def chunk_loop_inputs(m, f):  # shapes of what the while loop over anchor chunks reads
        jaxpr = jax.make_jaxpr(functools.partial(loss_and_grads, m))(trainable, f, batch).jaxpr
        loops = [e for e in jaxpr.eqns if e.primitive.name == "while"]
        return {tuple(v.aval.shape) for e in loops for v in e.params["body_jaxpr"].jaxpr.invars}

    q_kernel = frozen["base"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape  # [layers, in, out]
    assert q_kernel in chunk_loop_inputs(model, frozen)
    inputs = chunk_loop_inputs(loop, unstacked)
    assert q_kernel not in inputs and q_kernel[1:] in inputs


def _vocab_matmuls(jaxpr, vocab: int) -> int:
    """dot_generals with a vocab-sized operand or result in a jaxpr and every jaxpr inside it."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            count += any(vocab in v.aval.shape for v in (*eqn.invars, *eqn.outvars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    count += _vocab_matmuls(inner, vocab)
    return count


def test_soft_ce_rows_gradient_is_autodiff_without_recompute():
    """soft_ce_rows (row chunks of 4 over 10 rows, some invalid) gives the plain formula's values,
    argmaxes and gradient wrt the student rows under any per-row cotangent, and its gradient program
    runs 3 [rows, vocab] matmuls per chunk (student, teacher, the student's gradient), not the 5 of a
    rematerialised chunk, which recomputed both logits in the backward."""
    from mtp_jax.mtp.loss import soft_ce_rows

    keys = jax.random.split(jax.random.key(3), 4)
    vocab = 37
    s, t = (jax.random.normal(kk, (10, 8)) for kk in keys[:2])
    w = jax.random.normal(keys[2], (8, vocab))
    valid = jnp.arange(10) % 4 != 1
    cot = jax.random.uniform(keys[3], (10,))

    def ref(s):
        x, teacher = s @ w, t @ w
        ce = -jnp.sum(jax.nn.softmax(teacher) * jax.nn.log_softmax(x), -1)
        return jnp.where(valid, ce, 0.0), jnp.argmax(x, -1), jnp.argmax(teacher, -1)

    def ours(s):
        return soft_ce_rows(s, t, valid, w, row_chunk=4, impl="jnp")

    for a, b in zip(ours(s), ref(s)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda s: jnp.sum(cot * ours(s)[0]))(s)
    g_ref = jax.grad(lambda s: jnp.sum(cot * ref(s)[0]))(s)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    program = jax.make_jaxpr(jax.grad(lambda s: jnp.sum(cot * ours(s)[0])))(s).jaxpr
    assert _vocab_matmuls(program, vocab) == 3, _vocab_matmuls(program, vocab)


def test_remat_dots_keeps_the_split_attention():
    """Remat `dots` keeps split_prefix_attention's merged (out, lse), so its backward reruns no forward
    part (one logsumexp's max in the gradient program, against two under `full`), and the gradient is
    the un-rematerialised one."""
    from jax._src.ad_checkpoint import saved_residuals
    from mtp_jax.models.llama import REMAT_POLICIES
    from mtp_jax.mtp.attention import split_prefix_attention

    keys = jax.random.split(jax.random.key(0), 5)
    q, out_x = (jax.random.normal(kk, (1, 4, 4, 8)) for kk in keys[:2])
    k, v = (jax.random.normal(kk, (1, 12, 2, 8)) for kk in keys[2:4])
    lse_x = jax.random.normal(keys[4], (1, 4, 4))

    def f(q, out_x, lse_x):
        return jnp.sum(jnp.sin(split_prefix_attention(q, k, v, jnp.array([5]), out_x, lse_x, "xla")))

    ref = jax.grad(f, argnums=(0, 1, 2))(q, out_x, lse_x)
    maxes = {}
    for name in ("full", "dots"):
        g = jax.checkpoint(f, policy=REMAT_POLICIES[name])
        named = [what for _, what in saved_residuals(g, q, out_x, lse_x) if "mask_attention" in what]
        assert len(named) == (2 if name == "dots" else 0), (name, named)
        maxes[name] = str(jax.make_jaxpr(jax.grad(g))(q, out_x, lse_x)).count("reduce_max")
        assert_trees_close(jax.grad(g, argnums=(0, 1, 2))(q, out_x, lse_x), ref, 1e-6, name)
    assert maxes == {"full": 4, "dots": 2}, maxes


def test_auto_attention_picks_cudnn_only_where_it_runs(monkeypatch):
    """The attention plan resolves attention_impl 'auto' once: cuDNN on a GPU in bf16/fp16 with a head dim it
    takes, else XLA; a call with an odd length runs on XLA only where cuDNN was chosen automatically."""
    from mtp_jax.mtp.attention import AttentionPlan, plan_attention

    def impl(attention_impl="auto", dtype=jnp.bfloat16, head_dim=64):
        return plan_attention(MTPConfig(attention_impl=attention_impl), dtype, head_dim).impl

    assert impl() == "xla"  # this CPU
    assert impl("cudnn") == "cudnn"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert impl() == "cudnn"
    assert impl("xla") == "xla"
    assert impl(dtype=jnp.float32) == "xla"  # cuDNN: bf16/fp16 only
    assert impl(head_dim=60) == "xla"  # head dim not a multiple of 8
    q, k = jnp.zeros((1, 512, 36, 64), jnp.bfloat16), jnp.zeros((1, 512, 3, 64), jnp.bfloat16)
    auto = plan_attention(MTPConfig(), jnp.bfloat16, 64)
    assert auto.impl_for(q, k) == "cudnn"
    assert auto.impl_for(q[:, :511], k) == "xla"  # odd length with a mask in training
    assert AttentionPlan(impl="cudnn").impl_for(q[:, :511], k) == "cudnn"  # asked for: not overridden
    split = plan_attention(MTPConfig(prefix_split=True, dq_kernel="cudnn"), jnp.bfloat16, 64)
    assert (split.layout, split.dq_kernel) == ("split", "cudnn")


def lse_case(impl: str, dtype=jnp.float32, t=6, s=10, heads=4, kv=2, d=8):
    """d(sum(out * g_out) + sum(lse * g_lse))/dq under a prefix mask three ways: the written-out fp32
    attention (reference, on the inputs rounded to `dtype`), attention_lse and jax's attention alone, both
    in `dtype` on `impl`."""
    from mtp_jax.mtp.attention import _xla_prefix_attention, attention_lse

    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (2, t, heads, d)).astype(dtype)
    k, v = (jax.random.normal(kk, (2, s, kv, d)).astype(dtype) for kk in keys[1:3])
    g_out, g_lse = jax.random.normal(keys[3], q.shape), jax.random.normal(keys[4], q.shape[:3])
    mask = (jnp.arange(s)[None, :] <= jnp.linspace(2, s - 1, t).astype(int)[:, None])[None, None]

    def grad(fn, q):
        def f(q):
            out, lse = fn(q)
            return jnp.sum(out.astype(jnp.float32) * g_out) + jnp.sum(lse.astype(jnp.float32) * g_lse)
        return jax.grad(f)(q).astype(jnp.float32)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = grad(lambda q: _xla_prefix_attention(q, f32[1], f32[2], mask), f32[0])
    ours = grad(lambda q: attention_lse(q, k, v, mask, impl), q)
    raw = grad(lambda q: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                                      return_residual=True), q)
    return ref, ours, raw


def test_attention_lse_gradient_reaches_q():
    """attention_lse (the wrapper the cuDNN paths use, run here on jax's XLA attention, whose VJP drops
    the LSE's cotangent just as cuDNN's does) gives the written-out attention's gradient; jax's
    attention alone gets dq wrong (tests/test_mtp_gpu.py runs the same on cuDNN)."""
    ref, ours, raw = lse_case("xla")
    assert rel(ours, ref) < 1e-5
    assert rel(raw, ref) > 1e-2, "jax's own attention now carries the LSE gradient: the wrapper may go"


def test_auto_attention_reaches_cudnn_with_its_arguments(monkeypatch):
    """On a GPU (faked) both streams call cuDNN attention: the regular stream jax's, the mask stream's prefix
    the private binding (for its fp32 LSE); 'auto' resolved, each with its mask (the kernels themselves run
    in tests/test_mtp_gpu.py)."""
    from mtp_jax.mtp import attention
    from mtp_jax.mtp.attention import mask_attend, plan_attention, regular_attend

    calls = []

    def fake(q, k, v, *, mask, implementation, is_causal=False, return_residual=False, key_value_seq_lengths=None):
        lengths = None if key_value_seq_lengths is None else key_value_seq_lengths.tolist()
        calls.append((implementation, is_causal, lengths))
        return (q, jnp.zeros(q.shape[:3], q.dtype)) if return_residual else q

    def fake_private(q, k, v, mask, key_count, causal, return_residual=False):
        return fake(q, k, v, mask=mask, implementation="cudnn private", is_causal=causal,
                    return_residual=return_residual, key_value_seq_lengths=key_count)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(attention, "cudnn_attention", fake_private)
    seg = jnp.ones((2, 8), jnp.int32)
    x = jnp.zeros((2, 8, 4, 8), jnp.bfloat16)
    plan = plan_attention(MTPConfig(), jnp.bfloat16, 8)
    regular_attend(seg, plan)(x, x[:, :, :2], x[:, :, :2], None)
    q = jnp.zeros((2, 4 * 2, 4, 8), jnp.bfloat16)  # 4 anchors x 2 steps
    mask_attend(plan, 2, jnp.ones((2, 1, 4, 8), bool))(q, q[:, :, :2], q[:, :, :2], (x[:, :, :2], x[:, :, :2]))
    assert calls == [("cudnn", False, None), ("cudnn private", False, None)]


def test_regular_stream_is_the_base_model_bit_for_bit(setups):
    config, base = setups["llama"]
    model, params = build(setups["llama"], MTPConfig(draft_length=2))
    batch, _ = make_batch(EXAMPLES[:1], rows=1, length=14)
    from mtp_jax.mtp.objective import regular_stream

    hidden, _ = regular_stream(model, params, batch)
    plain = CausalLM(config)
    ref, _ = plain.apply({"params": base}, batch["tokens"], batch["positions"])
    np.testing.assert_array_equal(np.asarray(hidden), np.asarray(ref))


def test_oracle_gate_is_off_on_regular_tokens(setups):
    """In the interleaved oracle, regular tokens' logits are the base model's despite active adapters."""
    config, base = setups["qwen3"]
    model, params = build(setups["qwen3"], MTPConfig(draft_length=3))
    from mtp_jax.models.sampler import SamplerHead

    toks = np.random.default_rng(5).integers(3, 150, 12)
    _, _, reg_logits = oracle_loss_sum(CausalLM(config, LORA), SamplerHead(config.hidden_size, config.rms_norm_eps),
                                       params, [(toks, 4), (toks[:7], 2)], 3)
    for logits, t in zip(reg_logits, (toks, toks[:7])):
        ref = CausalLM(config).apply({"params": base}, jnp.asarray(t)[None], method=CausalLM.forward_logits)[0]
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5)


def test_sown_losses_appear_only_when_applied(setups):
    model, params = build(setups["llama"], MTPConfig(draft_length=2))
    config = model.config
    c, k, d = 2, 2, config.hidden_size
    kv = (jnp.zeros((config.num_layers, 1, 2, config.num_kv_heads, config.head_dim)),) * 2
    args = (params["mask_embedding"], jnp.arange(c), jnp.zeros((1, c), jnp.int32), jnp.ones((1, 2), jnp.int32), kv,
            jnp.zeros((1, c, k + 1, d)), jnp.ones((1, c, k), bool), jnp.zeros((1, c, k), jnp.int32))
    variables = model.init(jax.random.key(0), *args)
    assert "mtp_losses" not in variables, "init must not sow losses"
    from mtp_jax.mtp.objective import variables as to_vars

    _, state = model.apply(to_vars(params), *args, mutable=["mtp_losses"])
    assert set(state["mtp_losses"]) == {"step_1", "step_2", "accept"}


def test_metrics(setups):
    model, params = build(setups["llama"], MTPConfig(draft_length=3, soft_ce_impl="jnp"))
    batch, _ = make_batch(EXAMPLES, rows=3, length=16)
    trainable, frozen = split_params(model, params)
    loss, _, sums = loss_and_grads(model, trainable, frozen, batch)
    m = metrics_from_sums(sums, 3)
    # valid pairs per step: response tokens with a+j inside the example
    expected = [sum(max(0, r - j) for _, r in EXAMPLES) for j in (1, 2, 3)]
    assert [int(sums[f"step_{j}"]["count"]) for j in (1, 2, 3)] == expected
    total = sum(sums[f"step_{j}"]["loss"] for j in (1, 2, 3)) / sum(expected)
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-6)
    assert 1.0 <= float(m["accept_len"]) <= 4.0
    for j in (1, 2, 3):
        assert 0.0 <= float(m[f"acc/step_{j}"]) <= 1.0
