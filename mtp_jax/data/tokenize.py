"""Records -> token ids: the chat template (input = user turn, output = assistant turn) or plain text.

An example is (tokens, prompt_len): tokens[:prompt_len] is the prompt, the rest the response (the
MTP anchors). Chat: prompt = template([user], add_generation_prompt=True), full = template([user,
assistant]), the prompt must be a prefix of full. Raw: prompt = tokenizer(input) with its special
tokens, response = tokenizer(output) without them (so no second BOS) plus EOS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Literal, Sequence

import numpy as np

from mtp_jax.data.readers import DataError, Record


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    prompt_format: Literal["chat", "raw"] = "chat"
    max_prompt_tokens: int = 1024
    max_total_tokens: int = 2048
    truncation: Literal["truncate", "drop"] = "truncate"


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [length]
    prompt_len: int
    number: int  # record number in the source file
    truncated: bool = False


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over everything that changes token ids: the full tokenizer JSON (vocab, merges,
    normalizer, added and special tokens, post-processor), the special-token map and the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps([str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def _render_chat(tokenizer, record: Record) -> tuple[str, str]:
    user = [{"role": "user", "content": record.input}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record.output}], tokenize=False)
    return prompt, full


def tokenize_records(tokenizer, records: Sequence[Record], params: TokenizeParams, where: str
                     ) -> list[Example | DataError]:
    """One Example (or the DataError saying why the record is unusable) per record, batched through the
    fast tokenizer. Chat text is rendered by the template and tokenized without added special tokens,
    which is what `apply_chat_template(tokenize=True)` does."""
    if params.prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: prompt_format 'chat' but the tokenizer has no chat template; "
                            "use prompt_format: raw for base models")
        texts = [_render_chat(tokenizer, r) for r in records]
        ids = tokenizer([t for pair in texts for t in pair], add_special_tokens=False)["input_ids"]
        pairs = [(ids[2 * i], ids[2 * i + 1]) for i in range(len(records))]
    else:
        prompts = tokenizer([r.input for r in records], add_special_tokens=True)["input_ids"]
        responses = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        pairs = []
        for p, resp in zip(prompts, responses):
            if eos is not None and (not resp or resp[-1] != eos):
                resp = resp + [eos]
            pairs.append((p, p + resp))
    return [_layout(r, prompt, full, params, where) for r, (prompt, full) in zip(records, pairs)]


def _layout(record: Record, prompt: list[int], full: list[int], params: TokenizeParams, where: str):
    at = f"{where}: record {record.number} (line {record.line})"
    if full[:len(prompt)] != prompt:
        return DataError(f"{at}: the chat template is not prefix-stable (the generation prompt is not a prefix "
                         "of the conversation with the answer); use prompt_format: raw")
    response = full[len(prompt):]
    if not response:
        return DataError(f"{at}: the response has no tokens")
    truncated = False
    if len(prompt) > params.max_prompt_tokens:
        if params.truncation == "drop":
            return DataError(f"{at}: prompt has {len(prompt)} tokens > max_prompt_tokens "
                             f"{params.max_prompt_tokens} (truncation: drop)")
        prompt, truncated = prompt[-params.max_prompt_tokens:], True  # the end of the prompt conditions the answer
    room = params.max_total_tokens - len(prompt)
    if len(response) > room:
        if params.truncation == "drop":
            return DataError(f"{at}: prompt + response is {len(prompt) + len(response)} tokens > max_total_tokens "
                             f"{params.max_total_tokens} (truncation: drop)")
        response, truncated = response[:room], True
    return Example(np.asarray(prompt + response, np.int32), len(prompt), record.number, truncated)
