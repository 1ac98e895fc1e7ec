"""Gated LoRA: `W x + s * B(A(dropout(x))) * gate`, active only where gate = 1 (<mask> tokens).

Adapter weights live in their own variable collection, `lora`, so the base `params` tree keeps
its HF-derived names and the optimizer sees only adapters. `gate=None` skips the adapter
entirely: that is the regular stream, which must be the base model bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_COLLECTION = "lora"
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
FUSED_GROUPS = (("q", "k", "v"), ("gate", "up"))
# fused adapter group -> (block, module) of its adapter in a decoder layer's tree
FUSED_MODULES = {FUSED_GROUPS[0]: ("self_attn", "qkv_proj"), FUSED_GROUPS[1]: ("mlp", "gate_up_proj")}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0  # 0 disables adapters
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = TARGETS
    fuse: bool = False  # one adapter for q|k|v (rank 3r, alpha 3a) and one for gate|up (2r, 2a)
    bias: bool = False

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"lora.targets: unknown {bad}; expected a subset of {list(TARGETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def scale(self, n_fused: int = 1) -> float:
        r, a = self.rank * n_fused, self.alpha * n_fused
        return a / math.sqrt(r) if self.rslora else a / r

    def active(self, target: str) -> bool:
        return self.rank > 0 and target in self.targets

    def fused(self, target: str) -> bool:
        """Whether `target` is served by a fused adapter (q|k|v or gate|up) rather than its own."""
        return self.fuse and self.active(target) and any(target in g for g in FUSED_GROUPS)

    def group(self, group: tuple[str, ...]) -> tuple[str, ...]:
        """The members of a FUSED_GROUPS group that its fused adapter serves."""
        return tuple(t for t in group if self.fused(t))


def projection_lora(lora: LoRAConfig | None, target: str) -> LoRAConfig | None:
    """The adapter a single projection carries itself: None where off or folded into a fused one."""
    if lora is None or not lora.active(target) or lora.fused(target):
        return None
    return lora


def fuse_adapters(cfg: LoRAConfig, lora: dict) -> tuple[LoRAConfig, dict]:
    """The same adapters in the fused layout (`cfg.fuse`): per group of FUSED_GROUPS, the A matrices side
    by side and the B matrices block-diagonal, rescaled so the group's scale gives each part its own.

    Computes the same function (the zero blocks add exact zeros) with 8 adapter matmuls per layer instead
    of 14: speculative decoding at small batch is bound by kernel launches, not by their FLOPs.
    `lora`: the `lora` collection ({"model": {"layers": ...}}, leaves with a leading layers axis).
    """
    if cfg.fuse or cfg.rank == 0:
        return cfg, lora
    fused_cfg = dataclasses.replace(cfg, fuse=True)
    layers = dict(lora["model"]["layers"])
    for group, (module, name) in FUSED_MODULES.items():
        parts = fused_cfg.group(group)
        if not parts:
            continue
        projections = dict(layers[module])
        adapters = [projections.pop(f"{t}_proj") for t in parts]
        ratio = cfg.scale(1) / fused_cfg.scale(len(parts))
        blocks = [p["lora_B"] * ratio for p in adapters]
        b = jnp.zeros((*blocks[0].shape[:-2], sum(x.shape[-2] for x in blocks), sum(x.shape[-1] for x in blocks)),
                      blocks[0].dtype)
        row = col = 0
        for x in blocks:
            b = b.at[..., row:row + x.shape[-2], col:col + x.shape[-1]].set(x)
            row, col = row + x.shape[-2], col + x.shape[-1]
        projections[name] = {"lora_A": jnp.concatenate([p["lora_A"] for p in adapters], axis=-1), "lora_B": b}
        if cfg.bias:
            projections[name]["lora_bias"] = jnp.concatenate([p["lora_bias"] * ratio for p in adapters], axis=-1)
        layers[module] = projections
    return fused_cfg, {**lora, "model": {**lora["model"], "layers": layers}}


def kaiming_uniform_a_sqrt5(key, shape, dtype=jnp.float32):
    """torch.nn.Linear's default init for A ([in, r] here): U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_delta(module: nn.Module, x: jax.Array, out_features: int, cfg: LoRAConfig, n_fused: int,
               axes: tuple[str, str], gate, deterministic: bool, dtype, param_dtype) -> jax.Array:
    """Declares `lora_A` (then `lora_B`: `lora_up`) on `module` (collection `lora`); returns the gated update."""
    rank = cfg.rank * n_fused
    a = module.variable(
        LORA_COLLECTION, "lora_A", nn.with_logical_partitioning(kaiming_uniform_a_sqrt5, (axes[0], "lora_rank")),
        module.make_rng("params") if module.is_initializing() else None, (x.shape[-1], rank), param_dtype)
    if cfg.dropout > 0.0 and not deterministic:
        x = nn.Dropout(cfg.dropout, deterministic=False)(x)
    xa = x.astype(dtype) @ nn.unbox(a.value).astype(dtype)
    return lora_up(module, xa, out_features, cfg, n_fused, axes, gate, dtype, param_dtype)


def lora_up(module: nn.Module, xa: jax.Array, out_features: int, cfg: LoRAConfig, n_fused: int,
            axes: tuple[str, str], gate, dtype, param_dtype) -> jax.Array:
    """The adapter's second half: declares `lora_B` (and `lora_bias`) on `module` and returns
    `s * (xa @ B + bias) * gate` for `xa` = (dropout of) x @ A [..., rank * n_fused]."""
    b = module.variable(
        LORA_COLLECTION, "lora_B", nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", axes[1])),
        None, (cfg.rank * n_fused, out_features), param_dtype)
    delta = xa @ nn.unbox(b.value).astype(dtype)
    if cfg.bias:
        bias = module.variable(
            LORA_COLLECTION, "lora_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)), None, (out_features,), param_dtype)
        delta = delta + nn.unbox(bias.value).astype(dtype)
    delta = delta * jnp.asarray(cfg.scale(n_fused), dtype)
    if gate is not None and jnp.ndim(gate) > 0:
        delta = delta * jnp.asarray(gate, dtype)[..., None]
    return delta


class Linear(nn.Module):
    """A frozen projection `x @ kernel (+ bias)` with an optional gated LoRA beside it."""

    features: int
    axes: tuple[str, str]  # logical axes of the kernel [in, out]
    use_bias: bool = False
    lora: LoRAConfig | None = None  # None: no adapter on this projection
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, gate=None, deterministic: bool = True):
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
            (x.shape[-1], self.features), self.param_dtype)
        y = x.astype(self.dtype) @ kernel.astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is not None and gate is not None:
            y = y + lora_delta(self, x, self.features, self.lora, 1, self.axes, gate, deterministic,
                               self.dtype, self.param_dtype)
        return y


class FusedLoRA(nn.Module):
    """One adapter whose output is split across several projections (MTP-GLoRA's fused QKV / gate-up)."""

    splits: tuple[int, ...]
    axes: tuple[str, str]
    lora: LoRAConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, gate, deterministic: bool = True) -> list[jax.Array]:
        delta = lora_delta(self, x, sum(self.splits), self.lora, len(self.splits), self.axes, gate,
                           deterministic, self.dtype, self.param_dtype)
        cuts = [sum(self.splits[:i]) for i in range(1, len(self.splits))]
        return jnp.split(delta, cuts, axis=-1)
