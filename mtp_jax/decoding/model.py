"""The decoder layers of the decoding layouts (`layout.prepare`).

`DecodeLayer`: each adapter's A matrix rides as extra columns of the base kernel that reads the same
input (`layout.adapters_into_base`), so one matmul gives the base projection and x @ A; the adapter's
second half (B, bias, scale, gate: `lora_up`) applies to those columns. A fused adapter's A sits in its
group's first projection (q_proj for q|k|v, gate_proj for gate|up); an unfused one's in its own
projection. Same function as the training layer (`models.llama.DecoderLayer`, whose attention and MLP
math it reuses; only the projections differ), with 4 fewer matmuls per layer with fused adapters: a
speculative step at batch 1 is bound by its kernel count. Parameter names are the training tree's;
only the widened kernels' shapes and the missing `lora_A` leaves differ. Decoding only: x @ A is
computed without dropout.

`MergedDecodeLayer` (`prepare(merged=True)`): each adapted projection's kernel is [W | s A B]
(`layout.merge_adapters`), so one matmul per projection gives x W and the adapter's x s A B, and no
adapter matmul is left; rows whose gate is on add the second half to the first. Twice the bytes of
the adapted kernels per call: for models whose calls are bound by their kernel count (a small model
at batch 1), not by reading the weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mtp_jax.models.llama import MLP, Attention, DecoderLayer
from mtp_jax.models.lora import FusedLoRA, Linear, LoRAConfig, lora_up, projection_lora


def a_columns(lora: LoRAConfig | None, target: str, host_of: tuple[str, ...] = ()) -> int:
    """How many A columns the kernel of projection `target` carries: those of the fused adapter of
    `host_of` (the group whose first projection it is) where that group is fused, else its own
    adapter's rank (0 without one)."""
    if lora is None:
        return 0
    if host_of and lora.group(host_of):
        return lora.rank * len(lora.group(host_of))
    return lora.rank if lora.active(target) and not lora.fused(target) else 0


class WideLinear(nn.Module):
    """A projection over the core `Linear` with a kernel [in, features + a_columns]: its own adapter
    (`lora`, A in the kernel) applied here; `with_xa` also returns the A columns' output x @ A, for
    the fused adapter it hosts."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    lora: LoRAConfig | None = None  # its own adapter, or None
    a_columns: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.linear = Linear(self.features + self.a_columns, self.axes, dtype=self.dtype, param_dtype=self.param_dtype)
        nn.share_scope(self, self.linear)  # its kernel under this module's name, as in the training tree

    @nn.compact
    def __call__(self, x, gate=None, deterministic: bool = True, with_xa: bool = False):
        y, xa = self.linear(x), None
        if self.a_columns:
            y, xa = y[..., :self.features], y[..., self.features:]
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is not None and gate is not None:
            y = y + lora_up(self, xa, self.features, self.lora, 1, self.axes, gate, self.dtype, self.param_dtype)
        return (y, xa) if with_xa else y


class FusedLoRAUp(FusedLoRA):
    """A fused adapter's second half over x @ A [..., rank * len(splits)] from its host's kernel."""

    @nn.compact
    def __call__(self, xa, gate):
        delta = lora_up(self, xa, sum(self.splits), self.lora, len(self.splits), self.axes, gate, self.dtype,
                        self.param_dtype)
        return jnp.split(delta, [sum(self.splits[:i]) for i in range(1, len(self.splits))], axis=-1)


class WideProjections:
    """The decoding layout's projections (`WideLinear`, A in the kernels) and fused adapters
    (`FusedLoRAUp`), in place of `models.llama.Projections`' own."""

    def projection(self, name: str, features: int, axes: tuple[str, str], target: str, bias: bool,
                   host_of: tuple[str, ...] = ()) -> WideLinear:
        """`Projections.projection` in this layout: its kernel also carries the A columns of the fused group
        `host_of` when that group is fused."""
        lora = self.lora
        return WideLinear(features, axes, bias, projection_lora(lora, target), a_columns(lora, target, host_of),
                          self.dtype, self.param_dtype, name=name)

    def fused_adapter(self, splits: tuple[int, ...], axes: tuple[str, str]) -> FusedLoRAUp:
        return FusedLoRAUp(splits, axes, self.lora, self.dtype, self.param_dtype)


class WideAttention(WideProjections, Attention):
    def qkv(self, x, gate, deterministic):
        q, xa = self.q_proj(x, gate, deterministic, with_xa=True)
        k, v = self.k_proj(x, gate, deterministic), self.v_proj(x, gate, deterministic)
        if self.fused_targets and gate is not None:
            deltas = dict(zip(self.fused_targets, self.qkv_proj(xa, gate)))
            q, k, v = (y + deltas.get(t, 0.0) for y, t in zip((q, k, v), "qkv"))
        return q, k, v


class WideMLP(WideProjections, MLP):
    def gate_up(self, x, gate, deterministic):
        g, xa = self.gate_proj(x, gate, deterministic, with_xa=True)
        u = self.up_proj(x, gate, deterministic)
        if self.fused_targets and gate is not None:
            deltas = dict(zip(self.fused_targets, self.gate_up_proj(xa, gate)))
            g, u = g + deltas.get("gate", 0.0), u + deltas.get("up", 0.0)
        return g, u


class DecodeLayer(DecoderLayer):
    """`DecoderLayer` over the decoding layout's parameters (module docstring)."""

    attention_block = WideAttention
    mlp_block = WideMLP

    def __call__(self, x, layer_state, cos, sin, attend, gate=None, deterministic=True):
        if self.lora is not None and self.lora.dropout > 0.0 and not deterministic:
            raise ValueError("the decoding layout computes x @ A without dropout: deterministic only")
        return super().__call__(x, layer_state, cos, sin, attend, gate, deterministic)


class MergedLinear(WideLinear):
    """A `WideLinear` whose extra columns, where it has an adapter, are that adapter's whole update:
    kernel [W | s A B] (`layout.merge_adapters`), and rows with the gate on add x (s A B) to x W, as
    `lora_up` adds its update. (s A B rides as columns of its own rather than as W + s A B: rounded to
    bf16, that sum would keep only the part of the small update above W's last bit.)"""

    def __call__(self, x, gate=None, deterministic: bool = True):
        y, delta = super().__call__(x, with_xa=True)
        if delta is None or gate is None:
            return y
        return y + delta * jnp.asarray(gate, self.dtype)[..., None]


class MergedProjections:
    """The merged layout's projections (`MergedLinear`); its LoRA config is unfused, so no block adds a
    fused adapter's output."""

    def projection(self, name: str, features: int, axes: tuple[str, str], target: str, bias: bool,
                   host_of: tuple[str, ...] = ()) -> MergedLinear:
        update = features if self.lora is not None and self.lora.active(target) else 0
        return MergedLinear(features, axes, bias, None, update, self.dtype, self.param_dtype, name=name)


class MergedAttention(MergedProjections, Attention):
    pass


class MergedMLP(MergedProjections, MLP):
    pass


class MergedDecodeLayer(DecodeLayer):
    """`DecoderLayer` over the merged layout's parameters (module docstring)."""

    attention_block = MergedAttention
    mlp_block = MergedMLP
