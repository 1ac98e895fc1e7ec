"""The naive oracle (SPEC §2): one example as a single interleaved sequence with a dense mask.

Independent of the two-stream code: no K/V reuse, no folding, no LSE merge, no chunking, plain
log_softmax cross-entropy. Shares only the decoder and sampler modules (their params).
"""

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.models.llama import CausalLM
from mtp_jax.models.sampler import SamplerHead
from mtp_jax.mtp.layout import interleave


def dense_attend(mask):
    def attend(layer, q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None]), None
    return attend


def oracle_example(lm: CausalLM, sampler: SamplerHead, params, tokens, prompt_len, k, teacher_forcing=False,
                   lcm_weight=0.0):
    """(sum of losses over valid pairs, number of valid pairs, regular logits [L, V]) for one example."""
    il = interleave(np.asarray(tokens), prompt_len, k, mask_id=0)
    lm_vars = {"params": params["base"], "lora": params["lora"]}
    emb = lm.apply(lm_vars, jnp.asarray(il.tokens)[None], method=lm.embed)[0]
    is_mask = jnp.asarray(il.step > 0)
    emb = jnp.where(is_mask[:, None], params["mask_embedding"].astype(emb.dtype), emb)
    hidden, _ = lm.apply(lm_vars, None, jnp.asarray(il.positions)[None], dense_attend(jnp.asarray(il.attention)),
                         gate=jnp.asarray(il.gate)[None], embeddings=emb[None])
    hidden = hidden[0]
    logits = lm.apply(lm_vars, hidden, method=lm.logits)
    length = len(tokens)
    reg_rows = np.nonzero(il.step == 0)[0]  # interleaved index of regular position p
    reg_logits = logits[reg_rows]
    total, count = 0.0, 0
    for a in range(prompt_len, length):
        prev = jnp.argmax(reg_logits[a])
        for j in range(1, k + 1):
            if a + j >= length:
                break
            row = int(np.nonzero((il.regular_index == a) & (il.step == j))[0][0])
            if teacher_forcing:
                prev = jnp.asarray(tokens[a + j])  # x_{a+j}
            e = lm.apply(lm_vars, prev[None], method=lm.embed)[0]
            s_out = sampler.apply({"params": params["sampler"]}, e, hidden[row])
            student = lm.apply(lm_vars, s_out, method=lm.logits)
            teacher = reg_logits[a + j]
            ce = -jnp.sum(jax.nn.softmax(teacher) * jax.nn.log_softmax(student))
            total = total + ce
            if lcm_weight:
                total = total + lcm_weight * jnp.mean((hidden[row] - hidden[reg_rows[a + j]]) ** 2)
            count += 1
            prev = jnp.argmax(student)
    return total, count, reg_logits
