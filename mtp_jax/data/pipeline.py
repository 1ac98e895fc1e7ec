"""Cached examples -> device-ready numpy batches through grain, deterministic and resumable.

Per epoch a plan is drawn from (seed, epoch): shuffle the examples, sort each window of
`group_window` of them by length and pack it into rows (several short examples per row, told apart
by segment_ids), group rows of similar length into global batches and shuffle the batch order.
Every process computes the same plan and takes its slice of the rows of each global batch, so the
row length L (a bucket) agrees across hosts. The grain iterator's state is the next batch index.

Batch: tokens int32 [B, L], positions int32 [B, L] (restart at 0 per example), segment_ids int32
[B, L] (0 = padding, 1.. = example in row), response_mask bool [B, L] (response tokens = anchors: every assistant turn of a conversation).
"""

from __future__ import annotations

import logging
import sys
import threading

import grain
import numpy as np

from mtp_jax.data.cache import BuildParams, CachedDataset, build_cache, decode_example
from mtp_jax.data.config import DataConfig
from mtp_jax.data.readers import DataError
from mtp_jax.data.tokenize import TokenizeParams

log = logging.getLogger(__name__)


def bucket_lengths(capacity: int, multiple: int = 64, explicit: tuple[int, ...] = ()) -> np.ndarray:
    """Allowed row lengths: `explicit`, or multiple * {1, 2, 3, 4, 6, 8, 12, ...} up to the capacity
    (a few shapes to compile, at most a third of a row wasted on rounding)."""
    if explicit:
        return np.asarray(sorted(set(explicit)), np.int64)
    out, base = set(), multiple
    while base < capacity:
        out.update(b for b in (base, base * 3 // 2) if b < capacity and b % multiple == 0)
        base *= 2
    out.add(-(-capacity // multiple) * multiple)
    return np.asarray(sorted(out), np.int64)


def plan_epoch(lengths: np.ndarray, *, batch_size: int, capacity: int, buckets: np.ndarray, seed: int, epoch: int,
               shuffle: bool = True, packing: bool = True, length_grouping: bool = True, group_window: int = 2048,
               drop_remainder: bool = True, max_examples: int = 0) -> list[tuple[int, list[list[int]]]]:
    """[(row length L, rows)] for one epoch; each row a list of example indices, at most `max_examples` of
    them when packing (0: no bound). Deterministic in (seed, epoch). With drop_remainder=False the last
    batch may hold fewer than batch_size rows."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    rows: list[list[int]] = []
    for start in range(0, len(order), group_window):
        window = order[start:start + group_window]
        if length_grouping:
            window = window[np.argsort(-lengths[window], kind="stable")]
        rows.extend(_pack(window, lengths, capacity, max_examples) if packing else [[int(i)] for i in window])
    row_len = np.asarray([sum(int(lengths[i]) for i in r) for r in rows])
    if length_grouping:  # rows of similar length from the whole epoch share a batch; batch order is shuffled below
        idx = np.argsort(-row_len, kind="stable")
        rows, row_len = [rows[i] for i in idx], row_len[idx]
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if len(chunk) < batch_size and drop_remainder:
            break
        longest = int(row_len[start:start + batch_size].max())
        batches.append((int(buckets[np.searchsorted(buckets, longest)]), chunk))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _pack(window: np.ndarray, lengths: np.ndarray, capacity: int, max_examples: int = 0) -> list[list[int]]:
    """Rows of examples summing to <= capacity (and at most `max_examples` of them, 0: no bound): each row
    opens with the longest example left and is topped up with the shortest ones (window sorted longest
    first when grouping)."""
    rows = []
    lo, hi = 0, len(window) - 1
    room = max_examples or len(window)
    while lo <= hi:
        row, used = [int(window[lo])], int(lengths[window[lo]])
        lo += 1
        while lo <= hi and len(row) < room and used + lengths[window[hi]] <= capacity:
            row.append(int(window[hi]))
            used += int(lengths[window[hi]])
            hi -= 1
        rows.append(row)
    return rows


class PackedBatches(grain.MapDataset):
    """Global batch index -> this process's numpy batch; epochs follow each other, each as many batches
    as epoch 0's plan (len = epochs x that)."""

    def __init__(self, cache: CachedDataset, cfg: DataConfig, *, shuffle: bool, num_epochs: int,
                 drop_remainder: bool, process_index: int = 0, process_count: int = 1, seed: int | None = None):
        super().__init__()
        if cfg.batch_size % process_count:
            raise ValueError(f"data.batch_size ({cfg.batch_size}) must divide by the process count ({process_count}): "
                             "it counts rows of the global batch")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        self._source = grain.sources.ArrayRecordDataSource(list(cache.shards))
        self._lengths = cache.lengths
        self._pad_id = cache.pad_id
        self._capacity = cfg.row_capacity if cfg.packing else cfg.max_total_tokens
        self._plan_args = dict(batch_size=cfg.batch_size, capacity=self._capacity,
                               buckets=bucket_lengths(self._capacity, cfg.bucket_multiple, cfg.bucket_lengths),
                               seed=cfg.shuffle_seed if seed is None else seed, shuffle=shuffle, packing=cfg.packing,
                               length_grouping=cfg.length_grouping, group_window=cfg.group_window,
                               drop_remainder=drop_remainder, max_examples=cfg.max_examples_per_row)
        self._local = cfg.batch_size // process_count
        self._plans: dict[int, list] = {}
        self._offset = process_index * self._local
        self._batches_per_epoch = len(self.plan(0))
        if self._batches_per_epoch == 0:
            raise DataError(f"{cache.manifest['source']['path']}: its {len(cache)} examples make no full batch of "
                            f"{cfg.batch_size} rows; add data, lower data.batch_size, or turn data.packing off")
        self._num_epochs = num_epochs
        self._lock = threading.Lock()

    def plan(self, epoch: int) -> list[tuple[int, list[list[int]]]]:
        if epoch not in self._plans:
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan_epoch(self._lengths, epoch=epoch, **self._plan_args)
        return self._plans[epoch]

    @property
    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    def __len__(self) -> int:
        return sys.maxsize if self._num_epochs == 0 else self._num_epochs * self._batches_per_epoch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), self._batches_per_epoch)
        with self._lock:
            plan = self.plan(epoch)
        # Packing makes the batch count vary a little from epoch to epoch (35-37 for one seed and data);
        # every epoch is as long as epoch 0: a shorter one repeats its first batches, a longer one drops its last
        length, rows = plan[i % len(plan)]
        rows = rows[self._offset:self._offset + self._local]  # a short last eval batch leaves empty rows
        return self.assemble(rows, length)

    def assemble(self, rows: list[list[int]], length: int) -> dict[str, np.ndarray]:
        b = self._local
        tokens = np.full((b, length), self._pad_id, np.int32)
        positions = np.zeros((b, length), np.int32)
        segment_ids = np.zeros((b, length), np.int32)
        response_mask = np.zeros((b, length), bool)
        flat = [i for row in rows for i in row]
        records = iter(self._source.__getitems__(flat) if flat else [])
        for r, row in enumerate(rows):
            at = 0
            for seg, _ in enumerate(row, 1):
                toks, spans = decode_example(next(records))
                n = len(toks)
                tokens[r, at:at + n] = toks
                positions[r, at:at + n] = np.arange(n)
                segment_ids[r, at:at + n] = seg
                for start, end in spans:
                    response_mask[r, at + start:at + end] = True
                at += n
        return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "response_mask": response_mask}

    def __str__(self) -> str:
        return f"PackedBatches(batches_per_epoch={self._batches_per_epoch}, rows={self._local})"


def build_params(cfg: DataConfig) -> BuildParams:
    return BuildParams(TokenizeParams(cfg.prompt_format, cfg.max_prompt_tokens, cfg.max_total_tokens, cfg.truncation),
                       cfg.on_bad_record, cfg.examples_per_shard)


def prepare(cfg: DataConfig, tokenizer, draft_length: int, split: str = "train", one_span: bool = False
            ) -> CachedDataset:
    """The cache of cfg.train_file (split='train') or cfg.eval_file (split='eval'), built if needed. The
    cache is the same for every draft_length; it only counts the responses shorter than it. `one_span`:
    refuse examples with several responses (mtp.prefix_split needs each example's anchors contiguous)."""
    path = cfg.train_file if split == "train" else cfg.eval_file
    if path is None:
        raise ValueError(f"data: no file for split {split!r}")
    cache = build_cache(path, tokenizer, build_params(cfg), cfg.cache_dir, cfg.rebuild_cache)
    if one_span and cache.multi_span:
        raise DataError(f"{path}: {cache.multi_span} of {len(cache)} examples have several assistant turns, and "
                        "mtp.prefix_split needs one response per example; set mtp.prefix_split: false")
    short = cache.short_responses(draft_length)
    if short:
        log.info("%s: %d of %d responses shorter than draft_length %d", path, short, len(cache), draft_length)
    return cache


def make_batches(cache: CachedDataset, cfg: DataConfig, *, train: bool = True, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """grain dataset of numpy batches. train: shuffled by cfg.shuffle_seed, cfg.num_epochs (0 = forever),
    full batches only; eval: one pass in file order, the last batch filled up with empty rows."""
    ds = PackedBatches(cache, cfg, shuffle=train, num_epochs=cfg.num_epochs if train else 1,
                       drop_remainder=train, process_index=process_index, process_count=process_count)
    options = grain.ReadOptions(num_threads=cfg.num_workers, prefetch_buffer_size=2 * cfg.num_workers) \
        if cfg.num_workers else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return ds.to_iter_dataset(options)


def batch_iterator(cfg: DataConfig, tokenizer, draft_length: int, *, split: str = "train", process_index: int = 0,
                   process_count: int = 1, one_span: bool = False) -> grain.DatasetIterator:
    """One call for the training loop: build or reuse the cache, return a checkpointable iterator
    (`it.get_state()` / `it.set_state(state)`; `grain.checkpoint.CheckpointSave(it)` with orbax)."""
    cache = prepare(cfg, tokenizer, draft_length, split, one_span)
    return iter(make_batches(cache, cfg, train=split == "train", process_index=process_index,
                             process_count=process_count))
