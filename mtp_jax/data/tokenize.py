"""Records -> token ids with the response spans marked: the chat template renders the conversation, or
plain text for single-turn records.

An example is (tokens, spans): each span [start, end) is one response (an assistant turn), its tokens
the MTP anchors; everything else (system, user turns, template markup) conditions but is not trained.
Chat: the whole conversation is rendered once and tokenized with character offsets; assistant turn i
starts where the rendering of messages[:i] with the generation prompt ends and ends where the rendering
of messages[:i+1] ends, both of which must be prefixes of the whole rendering. A template that rewrites
earlier assistant turns once later ones follow (Qwen3 drops the empty think block of past turns) makes
the second render differ: the turn then ends at its first EOS token. Raw (one user turn and one
answer): prompt = tokenizer(input) with its special tokens, response = tokenizer(output) without them
(so no second BOS) plus EOS.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
from typing import Literal, Sequence

import numpy as np

from mtp_jax.data.records import DataError, Record


@dataclasses.dataclass(frozen=True)
class TokenizeParams:
    prompt_format: Literal["chat", "raw"] = "chat"
    max_prompt_tokens: int = 1024
    max_total_tokens: int = 2048
    truncation: Literal["truncate", "drop"] = "truncate"


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [length]
    spans: tuple[tuple[int, int], ...]  # response token ranges [start, end), sorted, disjoint, non-empty
    number: int  # record number in the source file
    truncated: bool = False
    form: str = "input-output"  # the record's format (readers.Record.form)

    @property
    def prompt_len(self) -> int:
        """Tokens before the first response."""
        return self.spans[0][0]

    @property
    def anchors(self) -> int:
        return sum(e - s for s, e in self.spans)

    @property
    def response_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.tokens), bool)
        for s, e in self.spans:
            mask[s:e] = True
        return mask


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


def render_chat(tokenizer, record: Record, where: str) -> tuple[str, list[tuple[int, int | None]]]:
    """(the rendered conversation, per response turn its character range [start, end); end None where the
    template rewrites the turn once later turns follow)."""
    full = tokenizer.apply_chat_template(record.chat(), tokenize=False)
    spans = []
    for i in record.response_turns:
        before = tokenizer.apply_chat_template(record.chat(i), add_generation_prompt=True, tokenize=False)
        if not full.startswith(before):
            raise DataError(f"{where}: the chat template is not prefix-stable (the generation prompt before "
                            f"message {i} is not a prefix of the rendered conversation); use prompt_format: raw "
                            "for single-turn records")
        through = tokenizer.apply_chat_template(record.chat(i + 1), tokenize=False)
        spans.append((len(before), len(through) if full.startswith(through) else None))
    return full, spans


def tokenize_records(tokenizer, records: Sequence[Record], params: TokenizeParams, where: str
                     ) -> list[Example | DataError]:
    """One Example (or the DataError saying why the record is unusable) per record, batched through the
    fast tokenizer. Chat text is rendered by the template and tokenized without added special tokens,
    which is what `apply_chat_template(tokenize=True)` does."""
    out: list[Example | DataError | None] = [None] * len(records)
    if params.prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: prompt_format 'chat' but the tokenizer has no chat template; "
                            "use prompt_format: raw for base models")
        rendered = {}
        for n, r in enumerate(records):
            try:
                rendered[n] = render_chat(tokenizer, r, f"{where}: {r.where}")
            except DataError as e:
                out[n] = e
        order = list(rendered)
        enc = tokenizer([rendered[n][0] for n in order], add_special_tokens=False, return_offsets_mapping=True)
        for n, ids, offsets in zip(order, enc["input_ids"], enc["offset_mapping"]):
            out[n] = _token_spans(records[n], ids, offsets, rendered[n][1], tokenizer.eos_token_id, params, where)
    else:
        pairs = [n for n, r in enumerate(records) if r.is_pair and r.output is not None]
        for n, r in enumerate(records):
            if not (r.is_pair and r.output is not None):
                out[n] = DataError(f"{where}: {r.where}: prompt_format raw takes one user turn and one answer; this "
                                   f"record has {len(r.messages)} messages; use prompt_format: chat")
        prompts = tokenizer([records[n].input for n in pairs], add_special_tokens=True)["input_ids"] if pairs else []
        responses = tokenizer([records[n].output for n in pairs], add_special_tokens=False)["input_ids"] \
            if pairs else []
        eos = tokenizer.eos_token_id
        for n, p, resp in zip(pairs, prompts, responses):
            if eos is not None and (not resp or resp[-1] != eos):
                resp = resp + [eos]
            out[n] = _layout(records[n], p + resp, [(len(p), len(p) + len(resp))], params, where)
    return out


def _token_spans(record: Record, ids: list[int], offsets, char_spans, eos_id, params: TokenizeParams, where: str):
    """Character spans -> token spans: a token belongs to the span its first character falls in."""
    starts = [s for s, _ in offsets]
    spans = []
    for (cs, ce), turn in zip(char_spans, record.response_turns):
        start = bisect.bisect_left(starts, cs)
        if ce is not None:
            end = bisect.bisect_left(starts, ce)
        else:
            end = next((t + 1 for t in range(start, len(ids)) if ids[t] == eos_id), None)
            if end is None:
                return DataError(f"{where}: {record.where}: the chat template renders assistant turn {turn} "
                                 "differently once later turns follow, and no EOS token ends it; use a template "
                                 "that keeps earlier turns as they were")
        spans.append((start, end))
    return _layout(record, ids, spans, params, where)


def _layout(record: Record, full: list[int], spans: list[tuple[int, int]], params: TokenizeParams, where: str):
    """Applies the length limits: the prompt before the first response keeps its end, the whole is cut at
    max_total_tokens; spans cut to nothing are dropped."""
    at = f"{where}: {record.where}"
    spans = [(s, e) for s, e in spans if e > s]
    if not spans:
        return DataError(f"{at}: the response has no tokens")
    truncated = False
    prompt_len = spans[0][0]
    if prompt_len > params.max_prompt_tokens:
        if params.truncation == "drop":
            return DataError(f"{at}: prompt has {prompt_len} tokens > max_prompt_tokens "
                             f"{params.max_prompt_tokens} (truncation: drop)")
        cut = prompt_len - params.max_prompt_tokens  # the end of the prompt conditions the answer
        full, spans, truncated = full[cut:], [(s - cut, e - cut) for s, e in spans], True
    if len(full) > params.max_total_tokens:
        if params.truncation == "drop":
            return DataError(f"{at}: prompt + response is {len(full)} tokens > max_total_tokens "
                             f"{params.max_total_tokens} (truncation: drop)")
        n = params.max_total_tokens
        full, spans, truncated = full[:n], [(s, min(e, n)) for s, e in spans if s < n], True
    return Example(np.asarray(full, np.int32), tuple(spans), record.number, truncated, record.form)
