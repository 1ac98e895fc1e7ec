"""The decoder: one Flax linen implementation of the Llama family and Qwen3.

The decoder layers run as one `nn.scan` (the compiled program holds one layer body), so their
parameters are stacked: `model.layers.self_attn.q_proj.kernel` [layers, in, out] holds
transformers' `model.layers.{i}.self_attn.q_proj.weight` for every i; otherwise names mirror
transformers', so HF checkpoints load tensor by tensor. `scan_layers=False` runs them as
straight-line code over per-layer params `model.layers_{i}` (`unstack_layers`): the training step's
anchor-chunk loop then reads each layer's weights in place instead of slicing a copy per chunk.
Attention is delegated to an `attend(q, k, v, layer_state) -> (out, aux)` callable: plain causal
attention here, a KV cache in generation, the two-stream prefix/block merge in MTP training.
`layer_state` is this layer's slice of a [layers, ...] pytree the caller passes in (a cache, the
regular stream's K/V); the layers' `aux` come back stacked the same way (a tuple over layers without
the scan).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.models.config import ModelConfig
from mtp_jax.models.lora import FUSED_GROUPS, LORA_COLLECTION, FusedLoRA, Linear, LoRAConfig, projection_lora

Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]

constrain = nn.with_logical_constraint


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * x32.astype(self.dtype)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, dtype, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., head_dim] for integer positions [...], computed in float32 as transformers does,
    times `scale` (YaRN's attention factor)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, length, heads, head_dim]; cos/sin [batch, length, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def causal_attend(kv_valid: jax.Array | None = None) -> Attend:
    """Plain causal self-attention; `kv_valid` [batch, length] hides padding keys.

    aux = the layer's (k, v), as the MTP regular stream returns them: a jitted caller that drops
    them loses nothing (XLA removes the unused outputs), and an eager one compiles the same layer
    body as the regular stream, so the two agree bit for bit (XLA fuses the RoPE differently in a
    scan body whose K is an output).
    """

    def attend(q, k, v, layer_state):
        mask = None
        if kv_valid is not None:
            mask = kv_valid[:, None, None, :]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
        return out, (k, v)

    return attend


class Projections(nn.Module):
    """A block of projections (attention or MLP) and how it builds them and its fused adapter, called from
    its `setup`: with their adapters here; the decoding layout (`decoding.model`) overrides both."""

    config: ModelConfig
    lora: LoRAConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def projection(self, name: str, features: int, axes: tuple[str, str], target: str, bias: bool,
                   host_of: tuple[str, ...] = ()):
        """Projection `name` with the adapter of LoRA target `target`; `host_of`: the fused group whose
        first projection this is (used by the decoding layout)."""
        return Linear(features, axes, bias, projection_lora(self.lora, target), self.dtype, self.param_dtype,
                      name=name)

    def fused_adapter(self, splits: tuple[int, ...], axes: tuple[str, str]):
        """The fused adapter of a projection group, outputs of sizes `splits`."""
        return FusedLoRA(splits, axes, self.lora, self.dtype, self.param_dtype)


class Attention(Projections):
    def setup(self):
        c, lora = self.config, self.lora
        bias = c.attention_bias
        self.q_proj = self.projection("q_proj", c.q_features, ("embed", "q_heads"), "q", bias, FUSED_GROUPS[0])
        self.k_proj = self.projection("k_proj", c.kv_features, ("embed", "kv_heads"), "k", bias)
        self.v_proj = self.projection("v_proj", c.kv_features, ("embed", "kv_heads"), "v", bias)
        self.o_proj = self.projection("o_proj", c.hidden_size, ("q_heads", "embed"), "o", False)
        self.fused_targets = lora.group(FUSED_GROUPS[0]) if lora is not None else ()
        if self.fused_targets:
            sizes = {"q": c.q_features, "k": c.kv_features, "v": c.kv_features}
            self.qkv_proj = self.fused_adapter(tuple(sizes[t] for t in self.fused_targets), ("embed", "q_heads"))
        if c.qk_norm:
            self.q_norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
            self.k_norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

    def qkv(self, x, gate, deterministic):
        """(q, k, v), each [batch, length, heads * head_dim], adapters applied."""
        q, k, v = (p(x, gate, deterministic) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.fused_targets and gate is not None:
            deltas = dict(zip(self.fused_targets, self.qkv_proj(x, gate, deterministic)))
            q, k, v = (y + deltas.get(t, 0.0) for y, t in zip((q, k, v), "qkv"))
        return q, k, v

    def __call__(self, x, cos, sin, attend: Attend, layer_state=None, gate=None, deterministic=True):
        c = self.config
        b, t, _ = x.shape
        q, k, v = self.qkv(x, gate, deterministic)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        out, aux = attend(q, k, v, layer_state)
        out = out.astype(self.dtype).reshape(b, t, c.q_features)
        return self.o_proj(out, gate, deterministic), aux


class MLP(Projections):
    def setup(self):
        c, lora = self.config, self.lora
        bias, mlp = c.mlp_bias, c.intermediate_size
        self.gate_proj = self.projection("gate_proj", mlp, ("embed", "mlp"), "gate", bias, FUSED_GROUPS[1])
        self.up_proj = self.projection("up_proj", mlp, ("embed", "mlp"), "up", bias)
        self.down_proj = self.projection("down_proj", c.hidden_size, ("mlp", "embed"), "down", bias)
        self.fused_targets = lora.group(FUSED_GROUPS[1]) if lora is not None else ()
        if self.fused_targets:
            self.gate_up_proj = self.fused_adapter((mlp,) * len(self.fused_targets), ("embed", "mlp"))

    def gate_up(self, x, gate, deterministic):
        """(gate, up) projections [batch, length, mlp], adapters applied."""
        g, u = self.gate_proj(x, gate, deterministic), self.up_proj(x, gate, deterministic)
        if self.fused_targets and gate is not None:
            deltas = dict(zip(self.fused_targets, self.gate_up_proj(x, gate, deterministic)))
            g, u = g + deltas.get("gate", 0.0), u + deltas.get("up", 0.0)
        return g, u

    def __call__(self, x, gate=None, deterministic=True):
        g, u = self.gate_up(x, gate, deterministic)
        h = constrain(nn.silu(g) * u, ("batch", "length", "mlp"))
        return self.down_proj(h, gate, deterministic)


class DecoderLayer(nn.Module):
    """One decoder layer as a scan body: (x, layer_state) -> (x, aux); the rest is broadcast."""

    config: ModelConfig
    lora: LoRAConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_block = Attention  # not fields: the decoding layout's layer swaps in its own blocks
    mlp_block = MLP

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
        self.self_attn = self.attention_block(c, self.lora, self.dtype, self.param_dtype)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
        self.mlp = self.mlp_block(c, self.lora, self.dtype, self.param_dtype)

    def __call__(self, x, layer_state, cos, sin, attend, gate=None, deterministic=True):
        h, aux = self.self_attn(self.input_layernorm(x), cos, sin, attend, layer_state, gate, deterministic)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), gate, deterministic)
        return constrain(x, ("batch", "length", "embed")), aux


# activation checkpointing per decoder layer (`jax.checkpoint` policies by name); "none" keeps everything
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    # keep the projections' outputs and the split prefix attention's merged (out, lse) (mtp.attention)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("mask_attention")),
}


def unstack_layers(tree: dict, num_layers: int) -> dict:
    """A params or lora tree ({"model": {"layers": ...}, ...}) in the layout of `scan_layers=False`:
    the stacked layers as `model.layers_{i}`."""
    model = tree["model"]
    if "layers" not in model:
        raise ValueError("unstack_layers: the tree holds no stacked `model.layers` (already per layer?)")
    rest = {name: v for name, v in model.items() if name != "layers"}
    per_layer = {f"layers_{i}": jax.tree.map(lambda a: a[i], model["layers"]) for i in range(num_layers)}
    return {**tree, "model": {**rest, **per_layer}}


def stack_layers(tree: dict, num_layers: int) -> dict:
    """The inverse of `unstack_layers`."""
    model = tree["model"]
    per_layer = [model[f"layers_{i}"] for i in range(num_layers)]
    rest = {name: v for name, v in model.items() if not re.fullmatch(r"layers_\d+", name)}
    return {**tree, "model": {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}}


class Transformer(nn.Module):
    """transformers' `LlamaModel` / `Qwen3Model`: embeddings, layers, final norm."""

    config: ModelConfig
    lora: LoRAConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # a key of REMAT_POLICIES
    unroll: int = 1  # layers per scan iteration (num_layers: straight-line code, for small-batch decoding)
    scan_layers: bool = True  # False: a Python loop over per-layer params (unstack_layers)
    layer: type[DecoderLayer] = DecoderLayer  # the layer module: DecoderLayer or one with its interface and tree

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        layer = self.layer
        if self.remat != "none":  # static: the attend callable and deterministic (self is argument 0)
            # a scan already keeps XLA from merging the recomputation into the forward; straight-line code not
            layer = nn.remat(self.layer, static_argnums=(5, 7), policy=REMAT_POLICIES[self.remat],
                             prevent_cse=not self.scan_layers)
        if self.scan_layers:  # one layer body over stacked params / adapters (leading "layers" axis), layer_state
            self.layers = nn.scan(
                layer, variable_axes={"params": 0, LORA_COLLECTION: 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * 5, length=c.num_layers, unroll=self.unroll,
                metadata_params={nn.PARTITION_NAME: "layers"})(c, self.lora, self.dtype, self.param_dtype)
        else:  # named layers_0, layers_1, ... by flax
            # nn.jit: JAX traces, differentiates and lowers the layer once and calls it num_layers times (XLA
            # inlines the calls, so the compiled program is the same); straight-line layers traced one by one
            # took most of the step's lowering time (Qwen3-8B's step: 7.7 s of tracing on a CPU, 1.4 s so)
            layer = nn.jit(layer, static_argnums=(5, 7))  # the attend callable and deterministic (self is 0)
            self.layers = [layer(c, self.lora, self.dtype, self.param_dtype) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(self, x, positions, attend, layer_state=None, gate=None, deterministic=True):
        """-> (final-normed hidden, aux stacked over layers); `layer_state` is a [layers, ...] pytree
        (without the scan: aux and `layer_state` are tuples over layers)."""
        cos, sin = rope_cos_sin(positions, jnp.asarray(self.config.rope_inv_freq()), self.dtype,
                                self.config.rope_attention_scaling)
        if self.scan_layers:
            x, aux = self.layers(x, layer_state, cos, sin, attend, gate, deterministic)
            return self.norm(x), aux
        aux = []
        for i, layer in enumerate(self.layers):
            x, layer_aux = layer(x, None if layer_state is None else layer_state[i], cos, sin, attend, gate,
                                 deterministic)
            aux.append(layer_aux)
        return self.norm(x), tuple(aux)


class OutputHead(nn.Module):
    """The untied lm_head: a [embed, vocab] matrix, exposed for row-chunked losses."""

    hidden_size: int
    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                                 (self.hidden_size, self.vocab_size), self.param_dtype)

    def __call__(self, hidden):
        return hidden.astype(self.dtype) @ self.kernel.astype(self.dtype)


class CausalLM(nn.Module):
    """`LlamaForCausalLM` / `Qwen3ForCausalLM`.

    `__call__` returns the final-normed hidden states [batch, length, embed] and the `aux` of
    `attend`, stacked over layers; `logits(h)` applies the lm_head (or the tied embedding).
    """

    config: ModelConfig
    lora: LoRAConfig | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    unroll: int = 1  # Transformer.unroll
    scan_layers: bool = True  # Transformer.scan_layers
    layer: type[DecoderLayer] = DecoderLayer  # Transformer.layer

    def setup(self):
        self.model = Transformer(self.config, self.lora, self.dtype, self.param_dtype, self.remat, self.unroll,
                                 self.scan_layers, self.layer)
        if not self.config.tie_word_embeddings:
            self.lm_head = OutputHead(self.config.hidden_size, self.config.vocab_size, self.dtype,
                                      self.param_dtype)

    def __call__(self, tokens, positions=None, attend: Attend | None = None, gate=None,
                 deterministic: bool = True, embeddings=None, layer_state=None) -> tuple[jax.Array, Any]:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens) if embeddings is None else embeddings
        x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
        return self.model(x, positions, attend or causal_attend(), layer_state, gate, deterministic)

    def embed(self, tokens):
        return self.model.embed_tokens(tokens)

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden.astype(self.dtype))
        return self.lm_head(hidden)

    def output_matrix(self) -> jax.Array:
        """[embed, vocab]: logits = hidden @ output_matrix()."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.embedding.T
        return self.lm_head.kernel

    def forward_logits(self, tokens, positions=None, kv_valid=None):
        """Convenience: base-model logits [batch, length, vocab] with causal attention."""
        hidden, _ = self(tokens, positions, causal_attend(kv_valid))
        return self.logits(hidden)
