"""Data: file -> records -> tokens -> cached examples -> packed, length-grouped batches (SPEC section 8).

Training loop entry points: `batch_iterator(cfg.data, tokenizer, draft_length, split=...)`, or
`prepare` (build/reuse the ArrayRecord cache) then `make_batches` (grain dataset of numpy batches).
"""

from mtp_jax.data.cache import BuildParams, CachedDataset, build_cache, open_cache
from mtp_jax.data.config import DataConfig
from mtp_jax.data.pipeline import PackedBatches, batch_iterator, bucket_lengths, make_batches, plan_epoch, prepare
from mtp_jax.data.readers import ReadStats, read_records, resolve_data_file
from mtp_jax.data.records import DataError, Record
from mtp_jax.data.tokenize import Example, TokenizeParams, tokenize_records, tokenizer_fingerprint

__all__ = ["BuildParams", "CachedDataset", "DataConfig", "DataError", "Example", "PackedBatches", "ReadStats",
           "Record", "TokenizeParams", "batch_iterator", "bucket_lengths", "build_cache", "make_batches",
           "open_cache", "plan_epoch", "prepare", "read_records", "resolve_data_file", "tokenize_records",
           "tokenizer_fingerprint"]
