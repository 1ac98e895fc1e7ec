"""DataConfig: where the training text comes from, how it is tokenized, cached and batched."""

from __future__ import annotations

import dataclasses
from typing import Literal

from mtp_jax.paths import absolute, absolute_file


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # `builtin:NAME` is a file shipped in mtp_jax/data/prompts/ (SmolLM2 self-distillation data)
    train_file: str = "builtin:smollm2_distill_train.jsonl"
    eval_file: str | None = "builtin:smollm2_distill_eval.jsonl"
    # chat: input = user turn, output = assistant turn of the tokenizer's chat template; raw: plain text
    prompt_format: Literal["chat", "raw"] = "chat"
    # truncate: a prompt keeps its last max_prompt_tokens tokens, a response is cut to fit max_total_tokens;
    # drop: an example over either limit is a bad record (see on_bad_record)
    max_prompt_tokens: int = 1024
    max_total_tokens: int = 2048
    truncation: Literal["truncate", "drop"] = "truncate"
    on_bad_record: Literal["error", "skip"] = "error"
    cache_dir: str = "~/.cache/mtp_jax/data"
    rebuild_cache: bool = False
    examples_per_shard: int = 50_000
    # batches: batch_size rows (global, split over processes), each row packs examples up to
    # max_tokens_per_row (0: max_total_tokens) when `packing`; row length L is the smallest bucket that fits
    batch_size: int = 8
    packing: bool = True
    max_tokens_per_row: int = 0
    # at most this many examples a packed row (0: no bound); the packed prefix_split on cuDNN takes at most
    # mtp.max_segments, so the 8B configs set both
    max_examples_per_row: int = 0
    length_grouping: bool = True
    group_window: int = 2048  # packing draws each row from one window of this many shuffled examples
    bucket_multiple: int = 64
    bucket_lengths: tuple[int, ...] = ()  # explicit row lengths; empty: multiple * {1, 2, 3, 4, 6, 8, ...}
    shuffle_seed: int = 0
    num_epochs: int = 0  # 0: repeat forever (training); eval always runs one pass
    num_workers: int = 0  # grain prefetch threads reading the cache; 0: read in the caller's thread

    def __post_init__(self):
        # paths absolute at load: the cache and a resumed run must not depend on the working directory
        if self.train_file:
            object.__setattr__(self, "train_file", absolute_file(self.train_file))
        if self.eval_file:
            object.__setattr__(self, "eval_file", absolute_file(self.eval_file))
        object.__setattr__(self, "cache_dir", str(absolute(self.cache_dir)))

        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        need(bool(self.train_file), "data.train_file must name a file")
        need(self.prompt_format in ("chat", "raw"), f"data.prompt_format must be chat|raw, got {self.prompt_format!r}")
        need(self.truncation in ("truncate", "drop"), f"data.truncation must be truncate|drop, got {self.truncation!r}")
        need(self.on_bad_record in ("error", "skip"),
             f"data.on_bad_record must be error|skip, got {self.on_bad_record!r}")
        need(self.max_prompt_tokens >= 1, f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        need(self.max_total_tokens > self.max_prompt_tokens,
             f"data.max_total_tokens ({self.max_total_tokens}) must exceed max_prompt_tokens "
             f"({self.max_prompt_tokens}) to leave room for a response")
        need(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        need(self.max_tokens_per_row == 0 or self.max_tokens_per_row >= self.max_total_tokens,
             f"data.max_tokens_per_row ({self.max_tokens_per_row}) must be 0 or >= max_total_tokens "
             f"({self.max_total_tokens}) so every example fits a row")
        need(self.max_examples_per_row >= 0,
             f"data.max_examples_per_row must be >= 0 (0: no bound), got {self.max_examples_per_row}")
        need(self.bucket_multiple >= 1, f"data.bucket_multiple must be >= 1, got {self.bucket_multiple}")
        need(all(b >= 1 for b in self.bucket_lengths), "data.bucket_lengths must be positive")
        need(not self.bucket_lengths or max(self.bucket_lengths) >= self.row_capacity,
             f"data.bucket_lengths: the largest ({max(self.bucket_lengths, default=0)}) must be >= the row "
             f"capacity ({self.row_capacity})")
        need(self.group_window >= 1, f"data.group_window must be >= 1, got {self.group_window}")
        need(self.examples_per_shard >= 1, "data.examples_per_shard must be >= 1")
        need(self.num_epochs >= 0, f"data.num_epochs must be >= 0, got {self.num_epochs}")
        need(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")

    @property
    def row_capacity(self) -> int:
        return self.max_tokens_per_row or self.max_total_tokens
