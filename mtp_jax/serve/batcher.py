"""The request-batching engine: one background thread decodes the pending requests together.

Granularity: a batch at a time (static batching). The thread takes the oldest pending request and up
to `max_batch - 1` more that share its sampling settings (temperature and top-p are compiled into
the decoding program) and fit the context together; it decodes them as one batch with
`speculative_calls` (or, in plain mode, `plain_calls`: the base model alone, one token per call),
`calls_per_read` model calls at a time (one dispatch and one read of their tokens: the host's work
per read is shared by that many calls), and hands each request its new text as the reads come. A
stop string found in a read ends the request there; its `calls` count the read's calls. Requests that
arrive meanwhile wait for the next batch; a batch ends when all its requests have finished (EOS,
their own `max_tokens`, a stop string) or were cancelled (a client gone).

Compiled shapes are bucketed so a server compiles a few programs, not one per request: the batch
is padded to the next of its batch sizes (default powers of two, and max_batch; `batch_sizes_of`)
with copies of its first prompt, whose output is dropped, the prompt to 16, 32, 64, ... tokens
(`request.padded_length`), and every batch gets the same decode length, `decode_length` (the
server's default max_tokens), unless a request asks for more; rows stop at their own max_tokens. A
program costs seconds to compile on a GPU, and a server that compiled on first use would stall the
requests that first meet a shape: `warm_up` compiles every batch size's programs for greedy prompts
up to a length before traffic comes (sampled requests compile theirs on first use: temperature and
top-p are part of the program). A request whose client left keeps its row until the batch ends, unread.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from typing import Callable, Sequence

import numpy as np

from mtp_jax.decoding.plain import plain_calls
from mtp_jax.decoding.request import padded_length
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.decoding.speculative import speculative_calls


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finish:
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    completion_tokens: int
    calls: int  # model calls while the request ran, its prompt call included
    acceptance: list[float]  # per draft position (none in plain mode)


@dataclasses.dataclass(frozen=True)
class Failure:
    message: str


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    emit: Callable[[Delta | Finish | Failure], None]  # thread-safe; called from the engine thread
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class TextStream:
    """A request's completion text as tokens come: the text safe to send so far (no half UTF-8
    character, nothing that may turn out to be the start of a stop string) and where a stop string cut it."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.tokens: list[int] = []
        self.sent = ""

    def add(self, tokens: Sequence[int]) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the text) after `tokens`."""
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.startswith(self.sent):  # a decoder that rewrites earlier text: wait until it settles
            return "", False
        hits = [i for i in (text.find(s, max(len(self.sent) - len(s) + 1, 0)) for s in self.stop) if i >= 0]
        if hits:
            return self._send(text[:min(hits)]), True
        hold = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:  # the longest tail of the text that begins a stop string
            hold = max([hold] + [n for n in range(1, len(s)) if text.endswith(s[:n])])
        return self._send(text[:len(text) - hold]), False

    def flush(self) -> str:
        """The held-back rest of the text, at the end of a request that no stop string ended."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return self._send(text) if text.startswith(self.sent) else ""

    def _send(self, text: str) -> str:
        new = text[len(self.sent):]
        self.sent = text if len(text) > len(self.sent) else self.sent
        return new


def _power_of_two(n: int, low: int = 1) -> int:
    return max(low, 1 << (n - 1).bit_length())


def batch_sizes_of(max_batch: int, sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """The row counts batches are padded to, ascending: `sizes` as given (the largest must be `max_batch`),
    or by default the powers of two below `max_batch` and `max_batch` itself. Each is a program per
    padded prompt length, so fewer sizes compile sooner; a batch pads to the next size up, and its
    padding rows cost compute (little where a call is bound by reading the weights)."""
    if sizes is None:
        return tuple(sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)}))
    sizes = tuple(sorted(set(sizes)))
    if not sizes or sizes[0] < 1 or sizes[-1] != max_batch:
        raise ValueError(f"batch sizes {list(sizes)}: expected sizes >= 1 whose largest is max_batch ({max_batch})")
    return sizes


DECODERS = {"speculative": speculative_calls, "plain": plain_calls}


class Batcher:
    """Decodes submitted Requests in batches of up to `max_batch` on a background thread (module
    docstring): `decoding` "speculative" (model, params: the MTPModel's, as `adapter.load_adapter`
    returns them) or "plain" (the base CausalLM's, `adapter.load_base`). `stats` counts batches,
    requests, the largest batch (real requests, not padding) and the requests dropped part-way
    because their client left."""

    def __init__(self, model, params, tokenizer, eos_ids: Sequence[int], pad_id: int, max_batch: int = 8,
                 batch_wait_s: float = 0.002, decoding: str = "speculative", decode_length: int = 256,
                 batch_sizes: Sequence[int] | None = None, calls_per_read: int = 1):
        if max_batch < 1 or decode_length < 1 or calls_per_read < 1:
            raise ValueError(f"max_batch, decode_length and calls_per_read must be >= 1, got {max_batch}, "
                             f"{decode_length} and {calls_per_read}")
        self.calls_per_read = calls_per_read
        self.batch_sizes = batch_sizes_of(max_batch, batch_sizes)
        if decoding not in DECODERS:
            raise ValueError(f"decoding {decoding!r}: expected one of {sorted(DECODERS)}")
        self.decoding, self._calls = decoding, DECODERS[decoding]
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.eos_ids, self.pad_id = list(eos_ids), pad_id
        self.max_batch, self.batch_wait_s, self.decode_length = max_batch, batch_wait_s, decode_length
        self.max_positions = model.config.max_position_embeddings
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "cancelled": 0}
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._backlog: list[Request] = []  # engine thread only
        self._thread: threading.Thread | None = None
        self._seed = 0

    def fits(self, prompt_len: int, max_tokens: int) -> bool:
        """Whether a prompt of `prompt_len` tokens and `max_tokens` fit the context (padding never
        takes room a prompt needs: `request.padded_length` stops at the context's limit)."""
        return prompt_len + max_tokens <= self.max_positions

    def rows(self, requests: int) -> int:
        """The rows a batch of `requests` is padded to: the smallest of `batch_sizes` that holds them."""
        return next(size for size in self.batch_sizes if size >= requests)

    def warm_up(self, prompt_tokens: int, progress: bool = True, threads: int = 4) -> int:
        """Compiles the programs of greedy batches of every size in `batch_sizes` with prompts up to
        `prompt_tokens` long (every padded length up to that one, as far as the context less the
        decode length allows) and the default decode length: each decodes a dummy batch for two reads
        (the prompt's call and one more). Up to `threads` pairs at a time: XLA compiles outside
        Python's lock, so distinct programs compile in parallel. Returns how many (rows, prompt
        length) pairs it ran. Call before `start`."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        from tqdm.auto import tqdm

        limit = self.max_positions - self.decode_length
        if prompt_tokens < 1 or limit < 1:
            raise ValueError(f"warm-up prompts of {prompt_tokens} tokens with a decode length of {self.decode_length} "
                             f"in a context of {self.max_positions}: need a prompt of at least 1 token that fits")
        prompt_tokens = min(prompt_tokens, limit)
        lengths = [padded_length(1, limit)]  # every padded length up to the longest prompt's
        while lengths[-1] < padded_length(prompt_tokens, limit):
            lengths.append(padded_length(lengths[-1] + 1, limit))
        pairs = [(rows, length) for rows in self.batch_sizes for length in lengths]
        never = [-1] * len(self.eos_ids)  # an EOS no token has: each dummy row runs past its first call

        def run(rows: int, length: int) -> None:
            calls = self._calls(self.model, self.params, [[self.pad_id] * length] * rows, self.decode_length,
                                never, Sampling(), 0, self.pad_id, calls_per_read=self.calls_per_read)
            try:
                for _, _ in zip(range(2), calls):
                    pass
            finally:
                calls.close()

        with ThreadPoolExecutor(max(1, threads)) as pool, \
                tqdm(total=len(pairs), desc=f"compiling ({self.decoding})", disable=not progress) as bar:
            for done in as_completed([pool.submit(run, rows, length) for rows, length in pairs]):
                done.result()  # a failed compile fails the warm-up
                bar.update()
        return len(pairs)

    def submit(self, request: Request) -> None:
        self._queue.put(request)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mtp-serve-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            if not self._backlog:
                first = self._queue.get()
                if first is None:
                    return
                self._backlog.append(first)
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._backlog) < self.max_batch:  # gather what arrives within the wait window
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if item is None:
                    return
                self._backlog.append(item)
            gone = [r for r in self._backlog if r.cancelled.is_set()]
            self.stats["cancelled"] += len(gone)
            self._backlog = [r for r in self._backlog if not r.cancelled.is_set()]
            batch = self._pick()
            if batch:
                self._run(batch)

    def _pick(self) -> list[Request]:
        """The oldest request and the next ones with its sampling that fit the context beside it."""
        batch, rest = [], []
        for r in self._backlog:
            joined = batch + [r]
            if len(batch) < self.max_batch and (not batch or r.sampling == batch[0].sampling) and \
                    self.fits(max(len(x.prompt) for x in joined), self._decode_length(joined)):
                batch = joined
            else:
                rest.append(r)
        self._backlog = rest
        return batch

    def _decode_length(self, batch: Sequence[Request]) -> int:
        """The batch's decode length: `decode_length` while every request asks for no more, else the
        power of two above its longest max_tokens, as far as the context allows (never below what a
        request asks)."""
        need = max(r.max_tokens for r in batch)
        room = self.max_positions - max(len(r.prompt) for r in batch)
        bucket = self.decode_length if need <= self.decode_length else _power_of_two(need, 16)
        return max(min(bucket, room), need)

    def _run(self, batch: list[Request]) -> None:
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        rows = self.rows(len(batch))
        prompts = [r.prompt for r in batch] + [batch[0].prompt] * (rows - len(batch))
        texts = [TextStream(self.tokenizer, r.stop) for r in batch]
        live = [True] * len(batch)
        self._seed += 1
        calls = self._calls(self.model, self.params, prompts, self._decode_length(batch), self.eos_ids,
                            batch[0].sampling, self._seed, self.pad_id, calls_per_read=self.calls_per_read)
        try:
            for call in calls:
                for i, r in enumerate(batch):
                    if live[i]:
                        live[i] = self._advance(r, texts[i], call, i)
                if not any(live):
                    break
        except Exception as e:  # a failed batch fails its requests, not the server
            traceback.print_exc()
            for i, r in enumerate(batch):
                if live[i]:
                    r.emit(Failure(f"decoding failed: {type(e).__name__}: {e}"))
        finally:
            calls.close()

    def _advance(self, r: Request, text: TextStream, call, row: int) -> bool:
        """Hands request `r` what its row gained in `call`; False once the request is over."""
        if r.cancelled.is_set():
            self.stats["cancelled"] += 1
            return False
        tokens = call.chunks[row][:r.max_tokens - len(text.tokens)]
        delta, stopped = text.add(tokens)
        eos = bool(tokens) and tokens[-1] in self.eos_ids
        reason = "stop" if stopped or eos else ("length" if len(text.tokens) >= r.max_tokens else None)
        if reason is None and call.done[row]:
            reason = "length"  # the row ran out of the batch's decode length (never below max_tokens)
        if reason and not stopped:
            delta += text.flush()
        if delta:
            r.emit(Delta(delta))
        if reason:
            offered = np.maximum(call.offered[row], 1)
            r.emit(Finish(reason, len(text.tokens), int(call.steps[row]),
                          [float(a) for a in call.accepted[row] / offered]))
        return reason is None
