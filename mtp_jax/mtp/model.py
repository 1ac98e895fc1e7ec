"""The MTP model: frozen base decoder with gated LoRA, the sampler head, and the draft losses.

`regular` runs the base model once (gate off) and keeps its K/V and hidden states; `__call__`
runs the mask stream for one chunk of anchors, drafts k tokens with the sampler head, and sows
per-step loss sums under `mtp_losses` (reaped by `mtp.objective`).

Variables: {'params': {'base': <HF-named base tree>, 'sampler': ...}, 'lora': {'base': ...}};
the `<mask>` embedding row is an argument, so it can be frozen or trained.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.models.config import ModelConfig
from mtp_jax.models.llama import CausalLM, DecoderLayer
from mtp_jax.models.lora import LoRAConfig
from mtp_jax.models.sampler import SamplerHead
from mtp_jax.mtp.attention import (AttentionPlan, mask_attend, plan_attention, regular_attend,
                                   segment_causal_mask)
from mtp_jax.mtp.loss import argmax_rows, soft_ce_rows, soft_ce_rows_vs_logits
from mtp_jax.mtp.split_attention import packed_chunk


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    draft_length: int = 4  # k
    chunk_size: int = 0  # anchors per mask-stream chunk; 0 = all at once
    # anchors left after the last full chunk run in chunks of this size (a divisor of chunk_size; 0 = off):
    # fewer padded anchor slots, for a second compiled chunk body
    tail_chunk: int = 0
    row_chunk: int = 1024  # soft-CE rows per chunk
    step_weights: tuple[float, ...] = ()  # per draft step; empty = all 1
    teacher_forcing: bool = False  # prev_j = real token x_{a+j} instead of the sampler's own draft
    lcm_weight: float = 0.0  # latent consistency loss (off by default, as in MTP-GLoRA)
    train_mask_embedding: bool = False
    mask_token: str = "<mask>"
    # the four attention options below resolve once into an AttentionPlan (mtp.attention.plan_attention)
    attention_impl: Literal["auto", "xla", "cudnn"] = "auto"  # auto: cuDNN on a GPU in bf16/fp16 (cudnn_fits)
    soft_ce_impl: Literal["auto", "triton", "jnp"] = "auto"
    remat: Literal["none", "full", "dots"] = "none"  # per-layer checkpointing of the mask stream (REMAT_POLICIES)
    # both streams without a mask: the regular stream causal over the row's real tokens, the mask stream's
    # prefix as the keys before each anchor chunk + its causal diagonal block, merged by LSE
    # (split_prefix_attention); with `packed`, per example (packed_split_attention)
    prefix_split: bool = False
    # rows may hold several examples (the training config sets it from data.packing): prefix_split then
    # attends per example, and reads k+1 teacher rows per anchor instead of one shared block per chunk
    packed: bool = False
    # packed prefix_split on cuDNN: the most examples in a row (the training loop refuses a row with more)
    max_segments: int = 64
    # prefix_split under cuDNN: the backward of the keys before each chunk, dq only from mtp_kernels' Triton
    # kernel ("triton", needs jax_triton; it skips the dK/dV that cuDNN's backward also forms) or cuDNN's full backward
    # ("cudnn"); auto = triton where jax_triton imports
    dq_kernel: Literal["auto", "cudnn", "triton"] = "auto"
    # the training step's layers under nn.scan (one compiled layer body), or as straight-line code over
    # per-layer weights: the scan slices a copy of every layer's weights (and zero-fills its residual stacks)
    # once per anchor chunk; the loop reads them in place, for a longer compile. Checkpoints, export and
    # decoding keep the stacked layout either way.
    scan_layers: bool = True

    def __post_init__(self):
        if self.draft_length < 1:
            raise ValueError(f"draft_length (k) must be >= 1, got {self.draft_length}")
        if self.chunk_size < 0 or self.row_chunk < 1:
            raise ValueError(f"chunk_size must be >= 0 and row_chunk >= 1 (got {self.chunk_size}, {self.row_chunk})")
        if self.tail_chunk and not (0 < self.tail_chunk < self.chunk_size and self.chunk_size % self.tail_chunk == 0):
            raise ValueError(f"tail_chunk must be 0 or a divisor of chunk_size below it (got tail_chunk "
                             f"{self.tail_chunk}, chunk_size {self.chunk_size})")
        if self.step_weights and len(self.step_weights) != self.draft_length:
            raise ValueError(f"step_weights has {len(self.step_weights)} entries; draft_length is {self.draft_length}")
        if self.max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, got {self.max_segments}")
        if self.lcm_weight < 0:
            raise ValueError(f"lcm_weight must be >= 0, got {self.lcm_weight}")

    def weight(self, step: int) -> float:
        return self.step_weights[step - 1] if self.step_weights else 1.0


class MTPModel(nn.Module):
    config: ModelConfig
    lora: LoRAConfig
    mtp: MTPConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    unroll: int = 1  # Transformer.unroll (decoding)
    plan: AttentionPlan | None = None  # None: resolved from `mtp` on jax's backend (`attention`)
    layer: type[DecoderLayer] = DecoderLayer  # Transformer.layer (decoding swaps in its own)

    @property
    def attention(self) -> AttentionPlan:
        """How both streams attend: `plan`, or the one `mtp` resolves to here."""
        return self.plan or plan_attention(self.mtp, self.dtype, self.config.head_dim)

    def setup(self):
        self.base = CausalLM(self.config, self.lora, self.dtype, self.param_dtype, self.mtp.remat, self.unroll,
                             self.mtp.scan_layers, self.layer)
        self.sampler = SamplerHead(self.config.hidden_size, self.config.rms_norm_eps, self.dtype, self.param_dtype)

    def regular(self, tokens, positions, segment_ids):
        """Base model over regular tokens: final hidden [b, l, d] and (k, v), each [layers, b, l, kv, d]
        (without the scan: a tuple over layers of (k, v), each [b, l, kv, d])."""
        return self.base(tokens, positions, regular_attend(segment_ids, self.attention))

    def mask_hidden(self, mask_embedding, anchor_index, positions, segment_ids, regular_kv, deterministic=True):
        """Mask stream for anchors `anchor_index` [c] or [b, c]: final hidden [b, c, k, d]."""
        k = self.mtp.draft_length
        b, c = positions.shape
        pos = (positions[..., None] + jnp.arange(1, k + 1)).reshape(b, c * k)
        emb = jnp.broadcast_to(mask_embedding.astype(self.dtype), (b, c * k, self.config.hidden_size))
        plan = self.attention
        if plan.split:
            index = (packed_chunk(anchor_index, segment_ids) if plan.packed
                     else jnp.broadcast_to(anchor_index[..., 0], (b,)))
            attend = mask_attend(plan, k, split_index=index)
        else:
            attend = mask_attend(plan, k, segment_causal_mask(segment_ids, anchor_index))
        hidden, _ = self.base(None, pos, attend, gate=1.0, deterministic=deterministic, embeddings=emb,
                              layer_state=regular_kv)
        return hidden.reshape(b, c, k, -1)

    def __call__(self, mask_embedding, anchor_index, positions, segment_ids, regular_kv, teacher_hidden,
                 valid, real_next, deterministic=True):
        """One chunk of anchors. Returns the weighted sum of losses over its valid pairs.

        anchor_index [c] or [b, c]; positions [b, c] (of the anchors); teacher_hidden [b, c, k+1, d] (base
        hidden at a+0..a+k) or, with prefix_split on one example per row (plan.shared_teacher: each row's
        anchors contiguous from the chunk's first),
        [b, c+k, d] (base hidden at first .. first+c+k-1), whose logits, formed once, serve every draft step;
        valid [b, c, k]; real_next [b, c, k] (x_{a+1..a+k}: prev_j = x_{a+j} when teacher forcing; otherwise
        prev_1 = the base argmax at a and prev_j = the sampler's draft j-1).
        """
        k = self.mtp.draft_length
        b, c = positions.shape
        d = self.config.hidden_size
        mask_h = self.mask_hidden(mask_embedding, anchor_index, positions, segment_ids, regular_kv, deterministic)
        out = self.base.output_matrix()
        teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
        split = self.attention.shared_teacher
        if split:  # one [b, c+k, vocab] block instead of k+1 teacher rows per anchor
            teacher_logits = teacher_hidden @ out.astype(teacher_hidden.dtype)
            prev = jnp.argmax(teacher_logits[:, :c], -1).astype(jnp.int32).reshape(b * c)

            def teacher(j):  # draft step j's teacher rows (logits) and their hidden states
                return (teacher_logits[:, j:j + c].reshape(b * c, -1), teacher_hidden[:, j:j + c].reshape(b * c, d))
        else:
            prev = argmax_rows(teacher_hidden[:, :, 0].reshape(b * c, d), out, self.mtp.row_chunk)

            def teacher(j):
                rows = teacher_hidden[:, :, j].reshape(b * c, d)
                return rows, rows
        total = jnp.float32(0.0)
        agree_run = jnp.ones((b * c,), bool)
        accepted = jnp.zeros((b * c,), jnp.float32)
        for j in range(1, k + 1):
            if self.mtp.teacher_forcing:
                prev = real_next[:, :, j - 1].reshape(b * c)  # x_{a+j}
            h = mask_h[:, :, j - 1].reshape(b * c, d)
            v = valid[:, :, j - 1].reshape(b * c)
            s_in = self.sampler(self.base.embed(prev), h)
            teacher_rows, teacher_h = teacher(j)
            rows_fn = soft_ce_rows_vs_logits if split else soft_ce_rows
            ce, s_arg, t_arg = rows_fn(s_in, teacher_rows, v, out, self.mtp.row_chunk, self.mtp.soft_ce_impl)
            agree = (s_arg == t_arg) & v
            agree_run = agree_run & agree
            accepted = accepted + agree_run
            step = {"loss": jnp.sum(ce), "count": jnp.sum(v).astype(jnp.float32),
                    "agree": jnp.sum(agree).astype(jnp.float32)}
            total = total + self.mtp.weight(j) * step["loss"]
            if self.mtp.lcm_weight > 0:
                target = teacher_h.astype(jnp.float32)
                dist = jnp.mean((h.astype(jnp.float32) - target) ** 2, axis=-1)
                step["lcm"] = jnp.sum(jnp.where(v, dist, 0.0))
                total = total + self.mtp.lcm_weight * step["lcm"]
            if not self.is_initializing():
                self.sow("mtp_losses", f"step_{j}", step)
            prev = s_arg
        anchors = valid[:, :, 0].reshape(b * c)
        if not self.is_initializing():
            self.sow("mtp_losses", "accept", {"accepted": jnp.sum(jnp.where(anchors, accepted, 0.0)),
                                              "anchors": jnp.sum(anchors).astype(jnp.float32)})
        return total
