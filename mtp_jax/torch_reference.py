"""PyTorch reference for an exported MTP model: transformers' model + gated LoRA hooks + the sampler head.

`load(out_dir)` reads what `mtp_jax.export` wrote; `MTPReference.draft_logits(tokens, anchors)`
evaluates SPEC §3/§4 literally, as one interleaved sequence under a dense 4D attention mask. Written
to be obviously correct, not fast: it is the proof that the export holds everything the drafts need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mtp_jax.export import ADAPTER_FILE, MTP_CONFIG_FILE, SAMPLER_PREFIX


class RMSNorm(torch.nn.Module):
    """Normalises in float32 and scales in the input dtype, as transformers' LlamaRMSNorm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SamplerHead(torch.nn.Module):
    """block1 = RMSNorm(SiLU(fc1(concat(E[prev], h)))); block2 = RMSNorm(SiLU(fc2(block1))); out = block1 + block2."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.fc1 = torch.nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.norm1 = RMSNorm(hidden_size, eps)
        self.fc2 = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm2 = RMSNorm(hidden_size, eps)

    def forward(self, prev_embedding, hidden):
        block1 = self.norm1(F.silu(self.fc1(torch.cat([prev_embedding, hidden], dim=-1))))
        return block1 + self.norm2(F.silu(self.fc2(block1)))


class GatedLoRA:
    """`W x + scale * lora_B(lora_A(x)) * gate` on every adapted linear, as forward hooks.

    The gate [batch, length] is set for one forward with `gated(gate)`; outside it the model is
    the plain base model.
    """

    def __init__(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], scales: dict[str, float]):
        self.gate: torch.Tensor | None = None
        prefixes = sorted(name[: -len(".lora_A.weight")] for name in tensors if name.endswith(".lora_A.weight"))
        for prefix in prefixes:
            a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
            bias = tensors.get(f"{prefix}.lora_B.bias")
            scale = scales[prefix.rsplit(".", 1)[1]]
            model.get_submodule(prefix).register_forward_hook(self._hook(a, b, bias, scale))

    def _hook(self, a, b, bias, scale):
        def hook(module, inputs, output):
            if self.gate is None:
                return None
            delta = F.linear(F.linear(inputs[0], a), b, bias) * scale
            return output + delta * self.gate[..., None].to(output.dtype)

        return hook

    @contextlib.contextmanager
    def gated(self, gate: torch.Tensor):
        self.gate = gate
        try:
            yield
        finally:
            self.gate = None


@dataclasses.dataclass
class Drafts:
    logits: torch.Tensor  # [anchors, k, vocab] (float32)
    tokens: torch.Tensor  # [anchors, k]: the argmax draft of each step, `<mask>` excluded


@dataclasses.dataclass
class MTPReference:
    model: torch.nn.Module  # transformers' *ForCausalLM
    lora: GatedLoRA
    sampler: SamplerHead
    config: dict  # mtp_config.json

    @property
    def mask_id(self) -> int:
        return self.config["mask_token_id"]

    @property
    def draft_length(self) -> int:
        return self.config["draft_length"]

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax over real tokens: `<mask>` is never a prediction."""
        return logits.index_fill(-1, torch.tensor([self.mask_id]), float("-inf")).argmax(-1)

    @torch.no_grad()
    def base_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, length, vocab]: the plain base model (gate off everywhere)."""
        return self.model(input_ids=tokens).logits

    def interleaved(self, tokens: torch.Tensor, anchors: Sequence[int]):
        """(ids, positions, 4D float mask) of x_0..x_{L-1} followed by each anchor's k masks (SPEC §2).

        A regular token sees regular tokens at or before it; mask m_{a,j} (position a+j) sees x_0..x_a
        and m_{a,1..j} of its own anchor.
        """
        k, length = self.draft_length, tokens.shape[0]
        total = length + len(anchors) * k
        ids = torch.cat([tokens, torch.full((len(anchors) * k,), self.mask_id, dtype=tokens.dtype)])
        positions = torch.cat([torch.arange(length)] + [torch.arange(a + 1, a + k + 1) for a in anchors])
        allowed = torch.zeros(total, total, dtype=torch.bool)
        allowed[:length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
        for i, a in enumerate(anchors):
            block = slice(length + i * k, length + (i + 1) * k)
            allowed[block, : a + 1] = True
            allowed[block, block] = torch.ones(k, k, dtype=torch.bool).tril()
        dtype = self.model.dtype
        mask = torch.zeros(total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return ids, positions, mask[None, None]

    @torch.no_grad()
    def draft_logits(self, tokens: torch.Tensor | Sequence[int], anchors: Sequence[int]) -> Drafts:
        """Draft logits of every anchor (SPEC §4): draft j of anchor a predicts x_{a+j+1}.

        prev_1 = the base model's argmax at a; prev_j = the sampler's argmax of draft j-1.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        anchors = [int(a) for a in anchors]
        if tokens.ndim != 1 or not all(0 <= a < tokens.shape[0] for a in anchors):
            raise ValueError(f"tokens must be 1-D and anchors in [0, {tokens.shape[-1]}); got anchors {anchors}")
        k, length = self.draft_length, tokens.shape[0]
        ids, positions, mask = self.interleaved(tokens, anchors)
        with self.lora.gated((ids == self.mask_id)[None]):
            hidden = self.model.model(input_ids=ids[None], position_ids=positions[None],
                                      attention_mask=mask).last_hidden_state[0]
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        prev = self.argmax(head(hidden[anchors]))
        mask_hidden = hidden[length:].view(len(anchors), k, -1)
        logits, drafts = [], []
        for j in range(k):
            step = head(self.sampler(embed(prev), mask_hidden[:, j]))
            prev = self.argmax(step)
            logits.append(step.float())
            drafts.append(prev)
        return Drafts(torch.stack(logits, 1), torch.stack(drafts, 1))


def load(out_dir: str | Path, dtype: torch.dtype = torch.float32) -> MTPReference:
    """The exported model in transformers with its gated LoRA and sampler head, in `dtype`."""
    out_dir = Path(out_dir)
    config = json.loads((out_dir / MTP_CONFIG_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).eval()
    tensors = {k: v.to(dtype) for k, v in load_file(str(out_dir / ADAPTER_FILE)).items()}
    lora = GatedLoRA(model, {k: v for k, v in tensors.items() if not k.startswith(SAMPLER_PREFIX)},
                     config["lora"]["scale"])
    s = config["sampler"]
    sampler = SamplerHead(s["hidden_size"], s["rms_norm_eps"]).to(dtype)
    sampler.load_state_dict({k[len(SAMPLER_PREFIX):]: v for k, v in tensors.items() if k.startswith(SAMPLER_PREFIX)})
    return MTPReference(model, lora, sampler.eval(), config)
