"""Streaming readers for training files: records of {"input", "output"}, {"messages": [...]} (the
OpenAI/TRL conversation form) or {"prompt", "completion"} (TRL's prompt-completion form, strings or
message lists), held in a JSON list, {"results": [...]}, JSONL, parquet or arrow files, or a directory
of parquet/arrow files (a `datasets` `save_to_disk` directory).

Nothing is loaded whole: JSON arrays are parsed element by element with `json.JSONDecoder.raw_decode`
over a growing text buffer, JSONL line by line, parquet and arrow files record batch by record batch.
Every problem names the file, the record number (1-based) and the line (or row); with
`on_bad_record="skip"` bad records are dropped and counted in `ReadStats`.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Literal

from mtp_jax.data.records import DataError, Record, parse_record
from mtp_jax.paths import BUILTIN as BUILTIN_PREFIX

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20
# a single record bigger than this is an error, not a reason to read the whole file into memory
MAX_RECORD_CHARS = 1 << 30
ARROW_BATCH_ROWS = 1024
EXPECTED = ('expected a JSON list of {"input", "output"}, {"messages": [...]} or {"prompt", "completion"} records, '
            '{"results": [...]}, JSONL, or parquet/arrow files with those columns')
COLUMNS = ("input", "output", "messages", "prompt", "completion", "id")  # what a columnar file is read for
COLUMNAR = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow"}


@dataclasses.dataclass
class ReadStats:
    """Counts of one pass over a file; `skipped_examples` keeps the first few problems for the report."""

    records: int = 0
    skipped: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)
    forms: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(message)

    def report(self, path) -> str:
        text = f"{path}: {self.records} records read, {self.skipped} bad records skipped"
        if self.skipped_examples:
            text += " (first: " + "; ".join(self.skipped_examples) + ")"
        return text


def resolve_data_file(path: str | os.PathLike) -> Path:
    """`builtin:NAME` -> the file shipped in mtp_jax/data/prompts/; anything else -> a checked path (a file,
    or a directory holding parquet/arrow files)."""
    text = os.fspath(path)
    if text.startswith(BUILTIN_PREFIX):
        p = Path(__file__).parent / "prompts" / text[len(BUILTIN_PREFIX):]
        if not p.is_file():
            shipped = sorted(q.name for q in p.parent.glob("*.jsonl"))
            raise DataError(f"{text}: no such built-in data file; shipped: {shipped}")
        return p
    p = Path(text).expanduser()
    if p.is_dir():
        columnar_files(p)  # raises when the directory holds no parquet/arrow data
        return p
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    return p


def columnar_files(directory: Path) -> list[Path]:
    """The data files of a directory: a `save_to_disk` directory's arrow files in its state.json order,
    else its .parquet/.arrow files sorted by name."""
    if (directory / "dataset_dict.json").is_file():
        splits = sorted(q.name for q in directory.iterdir() if q.is_dir())
        raise DataError(f"{directory}: is a datasets DatasetDict directory with splits {splits}; point the data file "
                        f"at one split's directory, e.g. {directory / (splits[0] if splits else 'train')}")
    state = directory / "state.json"
    if state.is_file():
        try:
            files = [directory / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state}: not a datasets state.json with _data_files ({e}); save the dataset again "
                            "with save_to_disk") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{directory}: state.json lists {missing} but they are missing; save the dataset again")
    else:
        files = sorted(q for q in directory.iterdir() if q.suffix in COLUMNAR and q.is_file())
    if not files:
        raise DataError(f"{directory}: is a directory with no .parquet or .arrow files; expected a .json or .jsonl "
                        "file, a parquet/arrow file, or a directory of them (datasets save_to_disk)")
    return files


def read_records(path: str | os.PathLike, on_bad_record: Literal["error", "skip"] = "error",
                 stats: ReadStats | None = None, require_output: bool = True) -> Iterator[Record]:
    """Yields the good records of `path` in file order.

    Bad records (not an object, missing or non-string or empty fields, malformed messages, invalid JSON or
    UTF-8 on a JSONL line) raise `DataError` or, with `on_bad_record="skip"`, are counted in `stats`.
    Damage that loses the record boundaries of a JSON array (invalid JSON, bad UTF-8) or makes a parquet
    or arrow file unreadable always raises. `require_output=False` reads prompts (no answer needed).
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    path = resolve_data_file(path)
    stats = stats if stats is not None else ReadStats()
    raw = _raw_records(path)
    produced = False
    for number, line, place, obj, error in raw:
        where = f"{path}: record {number} ({place})"
        if error is None:
            try:
                record = parse_record(obj, number, line, place, where, require_output)
            except DataError as e:
                error = str(e)
        else:
            error = f"{where}: {error}"
        if error is not None:
            if on_bad_record == "error":
                raise DataError(f"{error}; fix the record, or set on_bad_record to skip to drop bad records")
            stats.skip(error)
            continue
        stats.records += 1
        stats.forms[record.form] += 1
        produced = True
        yield record
    if not produced and stats.skipped == 0:
        raise DataError(f"{path}: no records; {EXPECTED}")
    if stats.skipped:
        log.warning(stats.report(path))


def _raw_records(path: Path):
    """(record number, line, place, parsed object or None, problem or None) per record of `path`."""
    if path.is_dir():
        return _columnar_records(path, columnar_files(path))
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.suffix in COLUMNAR or head.startswith(b"PAR1") or head.startswith(b"ARROW1"):
        return _columnar_records(path, [path])
    if not head:
        raise DataError(f"{path}: file is empty; {EXPECTED}")
    first = head.lstrip()[:1]
    if not first:
        raise DataError(f"{path}: file is empty (only whitespace); {EXPECTED}")
    if path.suffix in (".jsonl", ".ndjson") or first != b"[" and not _starts_results_object(head):
        return ((n, line, f"line {line}", obj, err) for n, line, obj, err in _jsonl_objects(path))
    return ((n, line, f"line {line}", obj, err) for n, line, obj, err in _whole_file_damage(_json_array_objects(path)))


def _columnar_records(path: Path, files: list[Path]):
    number = 0
    for file in files:
        row = 0
        for batch in _record_batches(file):
            for obj in batch.to_pylist():
                number += 1
                row += 1
                obj = {k: v for k, v in obj.items() if v is not None}  # a table of mixed formats has null cells
                yield number, 0, f"row {row} of {file.name}" if file != path else f"row {row}", obj, None


def _record_batches(file: Path):
    """Record batches of a parquet or arrow (IPC stream or file) file holding only the columns records use."""
    import pyarrow as pa  # only columnar data pays for the import
    import pyarrow.parquet as pq

    with open(file, "rb") as f:
        kind = COLUMNAR.get(file.suffix) or ("parquet" if f.read(4) == b"PAR1" else "arrow")
    try:
        if kind == "parquet":
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
            batches = pf.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=_columns(file, names))
        else:
            source = pa.memory_map(str(file))
            try:
                reader = pa.ipc.open_stream(source)  # what datasets' save_to_disk writes
                batches = iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            names = reader.schema.names
            columns = _columns(file, names)
            batches = (b.select(columns) for b in batches)
        yield from batches
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: not a readable {kind} file ({e}); write it again (it may be truncated)") from None


def _columns(file: Path, names: list[str]) -> list[str]:
    columns = [c for c in names if c in COLUMNS]
    if not {"input", "messages", "prompt"} & set(columns):
        raise DataError(f"{file}: columns {names[:10]}; expected an \"input\" (and \"output\"), a \"messages\", or a "
                        "\"prompt\" (and \"completion\") column")
    return columns


def _starts_results_object(head: bytes) -> bool:
    text = head.lstrip()
    if not text.startswith(b"{"):
        return False
    return text[1:].lstrip().startswith(b'"results"')


def _whole_file_damage(objects):
    """Damage that loses a JSON array's record boundaries cannot be skipped: say how to repair it."""
    try:
        yield from objects
    except DataError as e:
        raise DataError(f"{e}; repair the file and save it as UTF-8 (in JSONL, on_bad_record: skip can drop "
                        "single bad lines)") from None


def _jsonl_objects(path: Path):
    """(record number, line, parsed object or None, problem or None) per non-blank line."""
    number = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            number += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, line_no, None, f"invalid UTF-8 at byte {e.start} of the line"
                continue
            try:
                yield number, line_no, json.loads(text), None
            except json.JSONDecodeError as e:
                yield number, line_no, None, f"invalid JSON ({e.msg} at column {e.colno})"


class _TextStream:
    """Text of a UTF-8 file in chunks, with a consumed-prefix trim and line counting."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.line = 1  # line number at self.pos
        self.bytes_read = 0

    def more(self, at_least: int = 0) -> bool:
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:
            self.buf = self.buf[self.pos:]
            self.pos = 0
        data = self.f.read(max(at_least, CHUNK_CHARS))
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            line = self.line + self.buf.count(chr(10), self.pos) + data[:e.start].count(b"\n")
            raise DataError(f"{self.path}: invalid UTF-8 at byte {self.bytes_read + e.start} (near line {line})") \
                from None
        self.bytes_read += len(data)
        self.buf += text
        if not data:
            self.eof = True
            self.f.close()
        return True

    def advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def skip_ws(self) -> str:
        """Next non-whitespace character ('' at end of file), not consumed."""
        while True:
            n = len(self.buf)
            i = self.pos
            while i < n and self.buf[i] in " \t\r\n":
                i += 1
            self.advance(i)
            if i < n:
                return self.buf[i]
            if not self.more():
                return ""


def _json_array_objects(path: Path):
    decoder = json.JSONDecoder()
    s = _TextStream(path)
    try:
        if s.skip_ws() == "{":  # {"results": [...]}: consume up to the array
            s.advance(s.pos + 1)
            s.skip_ws()
            try:
                key, end = _decode_one(decoder, s, 0)
            except DataError:
                key = None
            if key != "results":
                raise DataError(f"{path}: expected {{\"results\": [...]}} at line {s.line}")
            s.advance(end)
            if s.skip_ws() != ":":
                raise DataError(f"{path}: expected ':' after \"results\" at line {s.line}")
            s.advance(s.pos + 1)
        if s.skip_ws() != "[":
            raise DataError(f"{path}: expected a JSON array at line {s.line}")
        s.advance(s.pos + 1)
        number = 0
        if s.skip_ws() == "]":
            return
        while True:
            number += 1
            c = s.skip_ws()
            if not c:
                raise DataError(f"{path}: record {number} (line {s.line}): file ends inside the array")
            start_line = s.line
            obj, end = _decode_one(decoder, s, number)
            s.advance(end)
            yield number, start_line, obj, None
            c = s.skip_ws()
            if c == "]":
                return
            if c != ",":
                got = repr(c) if c else "end of file"
                raise DataError(f"{path}: record {number} (line {s.line}): expected ',' or ']' after the record, "
                                f"got {got}")
            s.advance(s.pos + 1)
    finally:
        if not s.eof:
            s.f.close()


def _decode_one(decoder: json.JSONDecoder, s: _TextStream, number: int):
    """One JSON value at s.pos, reading more text while the value may be cut by the buffer end."""
    while True:
        try:
            obj, end = decoder.raw_decode(s.buf, s.pos)
            if end < len(s.buf) or s.eof:  # a number or literal touching the buffer end may go on
                return obj, end
        except json.JSONDecodeError as e:
            truncated = e.pos >= len(s.buf) - 16 or e.msg.startswith("Unterminated string")
            if s.eof or not truncated:
                line = s.line + s.buf.count("\n", s.pos, e.pos)
                raise DataError(f"{s.path}: record {number} (line {line}): invalid JSON ({e.msg})") from None
        if len(s.buf) - s.pos > MAX_RECORD_CHARS:
            raise DataError(f"{s.path}: record {number} (line {s.line}): record larger than "
                            f"{MAX_RECORD_CHARS} characters or unterminated")
        s.more(at_least=len(s.buf) - s.pos)  # doubling keeps a huge record linear
