"""Tokenized examples cached as ArrayRecord shards under a content key.

key = sha256(format version, input file fingerprint, tokenizer fingerprint, build parameters). The
stored examples do not depend on the draft length k, so one cache serves every k. A build writes
`<root>/.tmp-<key>-<pid>-*`, then shards, `lengths.npy`, `token_counts.npy` (how often each token id
occurs in the responses), `manifest.json` and `_SUCCESS`, and renames the folder to `<root>/<key>`;
a killed build leaves only a temp folder that nobody reads. Builders of one key serialize on an fcntl lock
`<root>/<key>.lock`: the first builds, the others wait and reuse its result.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from mtp_jax.data.readers import DataError, ReadStats, columnar_files, read_records, resolve_data_file
from mtp_jax.data.tokenize import Example, TokenizeParams, tokenize_records, tokenizer_fingerprint

log = logging.getLogger(__name__)

# 2: draft_length left the key and the manifest; 3: response spans (multi-turn) instead of one prompt length;
# 4: token_counts.npy
FORMAT_VERSION = 4
# an example: int32 record number, int32 span count n, n x (start, end), then the tokens


@dataclasses.dataclass(frozen=True)
class BuildParams:
    tokenize: TokenizeParams
    on_bad_record: Literal["error", "skip"] = "error"
    examples_per_shard: int = 50_000


@dataclasses.dataclass(frozen=True)
class CachedDataset:
    """A finished cache: shard paths, per-example lengths and the manifest."""

    path: Path
    shards: tuple[str, ...]
    lengths: np.ndarray  # int32 [n]: tokens per example
    anchors: np.ndarray  # int32 [n]: response tokens per example
    spans: np.ndarray  # int32 [n]: response spans (assistant turns) per example
    manifest: dict
    built: bool  # this call built it (False: reused)

    @property
    def pad_id(self) -> int:
        return int(self.manifest["pad_id"])

    def __len__(self) -> int:
        return len(self.lengths)

    def token_counts(self) -> np.ndarray:
        """int64 [tokenizer size]: how often each token id occurs in the examples' responses."""
        return np.load(self.path / "token_counts.npy")

    def short_responses(self, draft_length: int) -> int:
        """Examples with fewer than `draft_length` response tokens."""
        return int(np.sum(self.anchors < draft_length))

    @property
    def multi_span(self) -> int:
        """Examples with several response spans (multi-turn conversations)."""
        return int(np.sum(self.spans > 1))


def encode_example(ex: Example) -> bytes:
    header = [ex.number, len(ex.spans)] + [i for span in ex.spans for i in span]
    return np.concatenate([np.asarray(header, np.int32), ex.tokens.astype(np.int32)]).tobytes()


def decode_example(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [length], response spans int32 [spans, 2] of [start, end))."""
    arr = np.frombuffer(data, np.int32)
    n = int(arr[1])
    return arr[2 + 2 * n:], arr[2:2 + 2 * n].reshape(n, 2)


def file_fingerprint(path: Path) -> dict:
    """Path, size, mtime and a hash of the first and last MiB: cheap for a 10 GB file, and a rewrite
    of the same size within the mtime resolution still changes the head or tail hash. A directory:
    the same for each of its data files."""
    if path.is_dir():
        return {"path": str(path.resolve()), "files": [file_fingerprint(f) for f in columnar_files(path)]}
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


def cache_key(source: dict, tokenizer_fp: str, params: BuildParams) -> str:
    blob = json.dumps({"format_version": FORMAT_VERSION, "source": source, "tokenizer": tokenizer_fp,
                       "params": dataclasses.asdict(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def is_complete(path: Path) -> bool:
    if not (path / "_SUCCESS").is_file():
        return False
    try:
        return json.loads((path / "manifest.json").read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def open_cache(path: Path, built: bool = False) -> CachedDataset:
    if not is_complete(path):
        raise DataError(f"{path}: not a complete data cache (no _SUCCESS or manifest)")
    manifest = json.loads((path / "manifest.json").read_text())
    lengths = np.load(path / "lengths.npy")
    return CachedDataset(path, tuple(str(path / s["file"]) for s in manifest["shards"]), lengths[:, 0].copy(),
                         lengths[:, 1].copy(), lengths[:, 2].copy(), manifest, built)


def build_cache(data_file, tokenizer, params: BuildParams, cache_root, rebuild: bool = False,
                tokenizer_fp: str | None = None) -> CachedDataset:
    """The cache of `data_file` tokenized with `params`: reused when complete, else built (once, even
    when several processes ask at the same time). `rebuild` forces a new build."""
    source_path = resolve_data_file(data_file)
    root = Path(cache_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    source = file_fingerprint(source_path)
    tokenizer_fp = tokenizer_fp or tokenizer_fingerprint(tokenizer)
    key = cache_key(source, tokenizer_fp, params)
    final = root / key
    if not rebuild and is_complete(final):
        return open_cache(final)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not rebuild and is_complete(final):
            return open_cache(final)  # another process built it while we waited
        for stale in root.glob(f".tmp-{key}-*"):  # left by a killed builder; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=root))
        try:
            _write(tmp, source_path, source, tokenizer, tokenizer_fp, params, key)
            if final.exists():
                old = root / f".old-{key}-{os.getpid()}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return open_cache(final, built=True)


def _chunks(it: Iterator, size: int):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write(tmp: Path, source_path: Path, source: dict, tokenizer, tokenizer_fp: str, params: BuildParams,
           key: str) -> None:
    t0 = time.perf_counter()
    stats = ReadStats()
    tok_params = params.tokenize
    lengths: list[tuple[int, int, int]] = []
    token_counts = np.zeros(len(tokenizer), np.int64)
    forms: dict[str, dict[str, int]] = {}
    shards: list[dict] = []
    writer = None
    counts = {"truncated": 0, "skipped_tokenize": 0}
    skipped_examples = []
    records = read_records(source_path, params.on_bad_record, stats)
    for chunk in _chunks(records, 256):
        responses = []
        for ex in tokenize_records(tokenizer, chunk, tok_params, str(source_path)):
            if isinstance(ex, DataError):
                if params.on_bad_record == "error":
                    raise ex
                counts["skipped_tokenize"] += 1
                if len(skipped_examples) < 5:
                    skipped_examples.append(str(ex))
                continue
            if writer is None or shards[-1]["examples"] == params.examples_per_shard:
                if writer is not None:
                    writer.close()
                name = f"shard-{len(shards):05d}.array_record"
                writer = ArrayRecordWriter(str(tmp / name), "group_size:1")
                shards.append({"file": name, "examples": 0})
            writer.write(encode_example(ex))
            shards[-1]["examples"] += 1
            lengths.append((len(ex.tokens), ex.anchors, len(ex.spans)))
            responses.append(ex.tokens[ex.response_mask])
            counts["truncated"] += ex.truncated
            form = forms.setdefault(ex.form, {"examples": 0, "anchors": 0, "tokens": 0})
            form["examples"] += 1
            form["anchors"] += ex.anchors
            form["tokens"] += len(ex.tokens)
        if responses:  # one bincount a chunk: each costs the vocabulary's size
            token_counts += np.bincount(np.concatenate(responses), minlength=len(token_counts))
    if writer is not None:
        writer.close()
    skipped = stats.skipped + counts["skipped_tokenize"]
    if not lengths:
        first = (stats.skipped_examples + skipped_examples)[:1]
        raise DataError(f"{source_path}: no usable examples ({skipped} bad records skipped"
                        + (f"; first: {first[0]}" if first else "") + "); fix the records")
    np.save(tmp / "lengths.npy", np.asarray(lengths, np.int32))
    np.save(tmp / "token_counts.npy", token_counts)
    arr = np.asarray(lengths)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "source": source, "tokenizer_fingerprint": tokenizer_fp,
        "params": dataclasses.asdict(params), "pad_id": int(pad_id), "examples": len(lengths),
        "tokens": int(arr[:, 0].sum()), "anchors": int(arr[:, 1].sum()), "multi_span": int((arr[:, 2] > 1).sum()),
        "formats": forms,
        "skipped": skipped, "skipped_examples": (stats.skipped_examples + skipped_examples)[:5],
        "truncated": counts["truncated"], "shards": shards,
        "build_seconds": round(time.perf_counter() - t0, 3), "builder_pid": os.getpid(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with open(tmp / "_SUCCESS", "w") as f:
        f.flush()
        os.fsync(f.fileno())
    msg = f"data cache {key}: {len(lengths)} examples from {source_path}"
    if skipped:
        msg += f"; {skipped} bad records skipped (first: {manifest['skipped_examples'][0]})"
    log.warning(msg) if skipped else log.info(msg)
