"""Where speculative output parts from plain greedy decoding, and whether that is a near-tie (SPEC §10).

In bf16 a call that scores 25 rows rounds differently from a call that scores one, so two lossless
decoders can part where the plain decoder's top two logits are within rounding of each other.
`divergence` finds the first differing token and the plain decoder's top-2 margin there, from a
teacher-forced forward of prompt + plain output (one causal call, independent of either decoder);
`near_tie` says whether that margin is within bf16 rounding of logits of that size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from mtp_jax.models.llama import CausalLM

# how many units in the last place (at the logits' magnitude) a top-2 margin may span and still be a tie
NEAR_TIE_ULPS = 4.0


def near_tie(margin: float, logits: np.ndarray, dtype, ulps: float = NEAR_TIE_ULPS) -> bool:
    """Whether a top-2 logit margin is within `dtype` rounding of logits of that magnitude.

    logits: the row [vocab] (or just its top values) the margin was taken from. One ulp at the top
    logit's magnitude m is eps * 2**floor(log2 m) (eps = finfo(dtype).eps: 2**-7 for bf16). Two
    decoders that round the same logit differently each land within half an ulp of it, so each
    logit can differ by 1 ulp between them and their difference, the margin, by 2 ulps from the
    last rounding alone; the hidden state they came from carries rounding of its own, of the same
    order. NEAR_TIE_ULPS = 4 allows twice the last rounding's share: a margin above it is a real
    preference that no reordering of bf16 reductions should flip.
    """
    top = float(np.max(np.abs(np.asarray(logits, np.float64))))
    if top == 0.0:
        return margin == 0.0
    ulp = float(jnp.finfo(dtype).eps) * 2.0 ** math.floor(math.log2(top))
    return margin <= ulps * ulp


@dataclasses.dataclass(frozen=True)
class Divergence:
    index: int  # first new-token index where the two outputs differ
    margin: float  # plain decoder's top-1 minus top-2 logit there (teacher-forced)
    near_tie: bool  # `near_tie(margin, logits there, dtype)`
    plain_token: int
    other_token: int


def divergence(model: CausalLM, params: Any, prompt: Sequence[int], plain: Sequence[int], other: Sequence[int],
               plain_logits: np.ndarray | None = None, ulps: float = NEAR_TIE_ULPS) -> Divergence | None:
    """First difference of `other` (e.g. speculative output) from `plain` greedy output of `prompt`,
    with the plain decoder's top-2 margin there; None if one is a prefix of the other (no difference
    within the shorter, e.g. both stopped at the same EOS).

    model: the base CausalLM (any layout) and params its base tree; the margin comes from one causal
    forward of prompt + plain output, in the model's dtype. plain_logits: the plain decoder's own
    logits [len(plain), vocab], used instead of that forward where the caller kept them."""
    index = next((i for i, (a, b) in enumerate(zip(plain, other)) if a != b), None)
    if index is None:
        return None
    if plain_logits is not None:
        logits = np.asarray(plain_logits[index], np.float32)
    else:
        tokens = jnp.asarray([list(prompt) + list(plain[:index])], jnp.int32)
        params = params if "params" in params else {"params": params}
        logits = np.asarray(model.apply(params, tokens, method=CausalLM.forward_logits)[0, -1].astype(jnp.float32))
    top2 = np.sort(logits)[-2:]
    margin = float(top2[1] - top2[0])
    return Divergence(index, margin, near_tie(margin, top2, model.dtype, ulps), int(plain[index]), int(other[index]))
