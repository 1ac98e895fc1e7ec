"""The naive oracle (SPEC §2): each example as a single interleaved sequence with a dense mask.

Independent of the two-stream code: no K/V reuse, no head folding, no LSE merge, no chunking,
no packing, plain log_softmax cross-entropy. Shares only the decoder and sampler modules.
Examples are padded to a common interleaved length and run in one batch; padding rows are
never read.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.mtp.layout import interleave


def dense_attend(mask):
    def attend(q, k, v, layer_state):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None]), None
    return attend


def oracle_loss_sum(lm, sampler, params, examples, k, teacher_forcing=False, lcm_weight=0.0):
    """(sum of losses over valid pairs, number of pairs, per-example regular logits) for
    examples = [(tokens, prompt_len), ...]."""
    layouts = [interleave(np.asarray(t), p, k, mask_id=0) for t, p in examples]
    width = max(len(il.tokens) for il in layouts)
    n = len(layouts)
    ids = np.zeros((n, width), np.int32)
    pos = np.zeros((n, width), np.int32)
    gate = np.zeros((n, width), np.float32)
    is_mask = np.zeros((n, width), bool)
    attn = np.zeros((n, width, width), bool)
    for e, il in enumerate(layouts):
        t = len(il.tokens)
        ids[e, :t], pos[e, :t], gate[e, :t], is_mask[e, :t] = il.tokens, il.positions, il.gate, il.step > 0
        attn[e, :t, :t] = il.attention
        attn[e, t:, 0] = True  # padding rows: attend to something, never read
    lm_vars = {"params": params["base"], "lora": params["lora"]}
    emb = lm.apply(lm_vars, jnp.asarray(ids), method=lm.embed)
    emb = jnp.where(jnp.asarray(is_mask)[..., None], params["mask_embedding"].astype(emb.dtype), emb)
    hidden, _ = lm.apply(lm_vars, None, jnp.asarray(pos), dense_attend(jnp.asarray(attn)), gate=jnp.asarray(gate),
                         embeddings=emb)
    logits = lm.apply(lm_vars, hidden, method=lm.logits)

    # flat (example, interleaved row) indices of every pair, per draft step
    reg_rows = [np.nonzero(il.step == 0)[0] for il in layouts]
    total, count = 0.0, 0
    anchors = [(e, a) for e, (t, p) in enumerate(examples) for a in range(p, len(t))]
    ex = np.asarray([e for e, _ in anchors])
    an = np.asarray([a for _, a in anchors])
    prev = jnp.argmax(logits[ex, np.asarray([reg_rows[e][a] for e, a in anchors])], axis=-1)
    alive = np.ones(len(anchors), bool)
    for j in range(1, k + 1):
        alive = alive & np.asarray([a + j < len(examples[e][0]) for e, a in anchors])
        sel = np.nonzero(alive)[0]
        if len(sel) == 0:
            break
        e_s, a_s = ex[sel], an[sel]
        if teacher_forcing:
            prev_s = jnp.asarray([examples[e][0][a + j] for e, a in zip(e_s, a_s)])  # x_{a+j}
        else:
            prev_s = prev[sel]
        mask_rows = np.asarray([np.nonzero((layouts[e].regular_index == a) & (layouts[e].step == j))[0][0]
                                for e, a in zip(e_s, a_s)])
        teacher_rows = np.asarray([reg_rows[e][a + j] for e, a in zip(e_s, a_s)])
        h = hidden[e_s, mask_rows]
        s_out = sampler.apply({"params": params["sampler"]}, lm.apply(lm_vars, prev_s, method=lm.embed), h)
        student = lm.apply(lm_vars, s_out, method=lm.logits)
        teacher = logits[e_s, teacher_rows]
        total = total + jnp.sum(-jnp.sum(jax.nn.softmax(teacher) * jax.nn.log_softmax(student), axis=-1))
        if lcm_weight:
            total = total + lcm_weight * jnp.sum(jnp.mean((h - hidden[e_s, teacher_rows]) ** 2, axis=-1))
        count += len(sel)
        prev = jnp.zeros(len(anchors), jnp.int32).at[sel].set(jnp.argmax(student, axis=-1).astype(jnp.int32))
    regular_logits = [logits[e, reg_rows[e]] for e in range(n)]
    return total, count, regular_logits
