"""Streaming readers for training files: a JSON list of {"input", "output"}, {"results": [...]}, or JSONL.

Nothing is loaded whole: JSON arrays are parsed element by element with `json.JSONDecoder.raw_decode`
over a growing text buffer, JSONL line by line. Every problem names the file, the record number
(1-based) and the line; `on_bad_record="skip"` drops bad records and counts them in `ReadStats`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Literal

from mtp_jax.paths import BUILTIN as BUILTIN_PREFIX

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20
# a single record bigger than this is an error, not a reason to read the whole file into memory
MAX_RECORD_CHARS = 1 << 30
EXPECTED = 'expected a JSON list of {"input", "output"} records, {"results": [...]} or JSONL'


class DataError(ValueError):
    """A data file or record that cannot be used; the message names file, record and line."""


@dataclasses.dataclass(frozen=True)
class Record:
    input: str
    output: str | None
    number: int  # 1-based record number in the file
    line: int  # 1-based line where the record starts
    id: str | None = None


@dataclasses.dataclass
class ReadStats:
    """Counts of one pass over a file; `skipped_examples` keeps the first few problems for the report."""

    records: int = 0
    skipped: int = 0
    skipped_examples: list[str] = dataclasses.field(default_factory=list)

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
    """`builtin:NAME` -> the file shipped in mtp_jax/data/prompts/; anything else -> a checked path."""
    text = os.fspath(path)
    if text.startswith(BUILTIN_PREFIX):
        p = Path(__file__).parent / "prompts" / text[len(BUILTIN_PREFIX):]
        if not p.is_file():
            shipped = sorted(q.name for q in p.parent.glob("*.jsonl"))
            raise DataError(f"{text}: no such built-in data file; shipped: {shipped}")
        return p
    p = Path(text).expanduser()
    if p.is_dir():
        raise DataError(f"{p}: is a directory; expected a .json or .jsonl file")
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    return p


def _check_fields(obj, where: str, require_output: bool) -> tuple[str, str | None, str | None]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with \"input\" and \"output\", got {type(obj).__name__}")
    keys = ("input", "output") if require_output else ("input",)
    for key in keys:
        if key not in obj:
            raise DataError(f"{where}: missing \"{key}\" (keys present: {sorted(obj)[:10]})")
    values = []
    for key in ("input", "output"):
        value = obj.get(key)
        if value is None and key == "output" and not require_output:
            values.append(None)
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: \"{key}\" is empty")
        values.append(value)
    rid = obj.get("id")
    return values[0], values[1], rid if isinstance(rid, str) else None


def read_records(path: str | os.PathLike, on_bad_record: Literal["error", "skip"] = "error",
                 stats: ReadStats | None = None, require_output: bool = True) -> Iterator[Record]:
    """Yields the good records of `path` in file order (JSON list, {"results": [...]} or JSONL).

    Bad records (not an object, missing or non-string or empty "input"/"output", invalid JSON or
    UTF-8 on a JSONL line) raise `DataError` or, with `on_bad_record="skip"`, are counted in `stats`.
    Damage that loses the record boundaries of a JSON array (invalid JSON, bad UTF-8) always raises.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    path = resolve_data_file(path)
    stats = stats if stats is not None else ReadStats()
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; {EXPECTED}")
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.lstrip()[:1]
    if not first:
        raise DataError(f"{path}: file is empty (only whitespace); {EXPECTED}")
    if path.suffix in (".jsonl", ".ndjson") or first != b"[" and not _starts_results_object(head):
        raw = _jsonl_objects(path)
    else:
        raw = _whole_file_damage(_json_array_objects(path))
    produced = False
    for number, line, obj, error in raw:
        where = f"{path}: record {number} (line {line})"
        if error is None:
            try:
                inp, out, rid = _check_fields(obj, where, require_output)
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
        produced = True
        yield Record(inp, out, number, line, rid)
    if not produced and stats.skipped == 0:
        raise DataError(f"{path}: no records; {EXPECTED}")
    if stats.skipped:
        log.warning(stats.report(path))


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
