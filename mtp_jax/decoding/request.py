"""A decoding request: prompts as token ids, left-padded into one batch and checked, and the
tokenizer-side helpers (chat template, EOS and pad ids) every decoding entry point shares."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] left-padded ids (length rounded up to limit recompiles) and pad counts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, length - len(p):] = p
    return tokens, np.asarray([length - len(p) for p in prompts], np.int32)


def check_request(prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                  max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """The checked request as `left_pad`'s (tokens, pad counts); ValueError names what is wrong."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not eos_ids:
        raise ValueError("eos_ids is empty; pass the tokenizer's EOS id")
    tokens, pad_len = left_pad(prompts, pad_id)
    if tokens.shape[1] + max_new_tokens > max_positions:
        raise ValueError(f"prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({max_positions})")
    return tokens, pad_len


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat and tokenizer.chat_template:
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    """A conversation ({"role", "content"} dicts) rendered by the chat template, ready for the assistant's turn."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=False))


def eos_ids_of(tokenizer, config) -> list[int]:
    ids = list(config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_id_of(tokenizer, eos_ids: Sequence[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
