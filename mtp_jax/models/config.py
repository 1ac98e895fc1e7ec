"""Architecture description of a Llama-family or Qwen3 decoder, read from a HF `config.json`.

One frozen dataclass drives the single decoder in `llama.py`; the switches (q/k-norm, tied
embeddings, rope scaling, biases) come from the HF config so no per-model code exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")


class UnsupportedModelError(ValueError):
    """The checkpoint describes an architecture this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    attention_bias: bool = False
    mlp_bias: bool = False
    # llama3 scaling as (factor, low_freq_factor, high_freq_factor, original_max_positions)
    rope_llama3: tuple[float, float, float, int] | None = None
    # YaRN (Qwen3 beyond 32k) as (factor, original_max_positions, beta_fast, beta_slow, attention_factor, truncate)
    rope_yarn: tuple[float, int, float, float, float, bool] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_features(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_features(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported; expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family or Qwen3 decoders)."
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {hf['hidden_act']!r}; expected 'silu'.")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise UnsupportedModelError(f"{source}: missing keys {missing}.")
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3 = yarn = None
        if rope_type == "llama3":
            llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]),
                      float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        elif rope_type == "yarn":
            yarn = _yarn(rope, hf.get("max_position_embeddings", 2048), source)
        elif rope_type not in ("default", None):
            raise UnsupportedModelError(
                f"{source}: rope type {rope_type!r} is not supported; expected 'default', 'llama3' or 'yarn'.")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: sliding-window attention is not supported.")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3",
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            rope_llama3=llama3,
            rope_yarn=yarn,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); restore the model's Hugging Face "
                             "config.json.") from None
        return cls.from_hf(hf, source=str(path))

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
        dim = self.head_dim
        pos_freqs = _powf(self.rope_theta, np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        inv = (1.0 / pos_freqs).astype(np.float32)
        if self.rope_yarn is not None:
            return _yarn_inv_freq(pos_freqs, self.rope_yarn, self.rope_theta, dim)
        if self.rope_llama3 is None:
            return inv
        factor, low, high, old_len = self.rope_llama3
        low_wavelen, high_wavelen = old_len / low, old_len / high
        # torch divides a scalar by a tensor as reciprocal(tensor) * scalar: two roundings, kept here
        wavelen = (1 / inv) * (2 * math.pi)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = ((1 / wavelen) * old_len - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    @property
    def rope_attention_scaling(self) -> float:
        """Factor on cos/sin (YaRN's attention factor; 1 otherwise)."""
        return self.rope_yarn[4] if self.rope_yarn is not None else 1.0


def _yarn(rope: dict, max_positions: int, source: str) -> tuple[float, int, float, float, float, bool]:
    """YaRN parameters as transformers reads them (`_compute_yarn_parameters`), with its defaults."""
    original = int(rope.get("original_max_position_embeddings") or max_positions)
    factor = rope.get("factor")
    factor = float(factor) if factor is not None else max_positions / original
    if factor < 1.0:
        raise UnsupportedModelError(f"{source}: yarn rope factor {factor} < 1.")

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return (factor, original, float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1),
            float(attention), bool(rope.get("truncate", True)))


def _powf(base: float, exponents: np.ndarray) -> np.ndarray:
    """float32 `base ** exponents`, correctly rounded: the float64 power of the float32 operands,
    rounded once. This is C's powf, which torch's pow runs element by element (its scalar kernel,
    and the tail of a vectorized loop); torch's SIMD kernel (SLEEF, within 1 ulp) may differ in the
    last bit, so a numpy function cannot follow transformers' vectorized result on every CPU."""
    return np.power(np.float64(np.float32(base)), exponents.astype(np.float64)).astype(np.float32)


def _yarn_inv_freq(pos_freqs: np.ndarray, yarn: tuple, base: float, dim: int) -> np.ndarray:
    """YaRN: interpolated (inv / factor) for long wavelengths, the original for short ones, a linear
    ramp between the correction dims of beta_fast and beta_slow rotations (float32, as transformers)."""
    factor, original, beta_fast, beta_slow, _, truncate = yarn

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv = (1.0 / pos_freqs).astype(np.float32)
    interpolated = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (interpolated * (1 - extrapolation) + inv * extrapolation).astype(np.float32)
