"""A decoding request: prompts as token ids, left-padded into one batch and checked, and the
tokenizer-side helpers (chat template, EOS and pad ids) every decoding entry point shares."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def padded_length(n: int, limit: int | None = None) -> int:
    """The length a batch whose longest prompt has `n` tokens is left-padded to: the next of 16, 32, 64,
    ..., 512, then the next multiple of 512, but not past `limit` (the room the context leaves) unless
    `n` itself is. Each padded length is a compiled program of its own, so they are few (a server can
    compile them all ahead of traffic), at the cost of at most twice the prompt call's tokens."""
    length = max(16, 1 << (n - 1).bit_length()) if n <= 512 else -(-n // 512) * 512
    return max(n, min(length, limit)) if limit is not None else length


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, limit: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] left-padded ids (`padded_length` of the longest prompt) and pad counts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    length = padded_length(max(len(p) for p in prompts), limit)
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
    tokens, pad_len = left_pad(prompts, pad_id, max_positions - max_new_tokens)
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
