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
from typing import Iterator, Literal, NamedTuple

from mtp_jax.paths import BUILTIN as BUILTIN_PREFIX

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20
# a single record bigger than this is an error, not a reason to read the whole file into memory
MAX_RECORD_CHARS = 1 << 30
ARROW_BATCH_ROWS = 1024
EXPECTED = ('expected a JSON list of {"input", "output"}, {"messages": [...]} or {"prompt", "completion"} records, '
            '{"results": [...]}, JSONL, or parquet/arrow files with those columns')
ROLES = ("system", "user", "assistant")
COLUMNS = ("input", "output", "messages", "prompt", "completion", "id")  # what a columnar file is read for
COLUMNAR = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow"}


class DataError(ValueError):
    """A data file or record that cannot be used; the message names file, record and line."""


class Message(NamedTuple):
    role: str  # system | user | assistant
    content: str


@dataclasses.dataclass(frozen=True)
class Record:
    """One conversation. A text pair ({"input", "output"}, string prompt-completion) is a user turn and
    an assistant turn; the assistant turns from `first_response` on are the responses (the anchors)."""

    messages: tuple[Message, ...]
    number: int  # 1-based record number in the file (across the files of a directory)
    line: int  # 1-based line where the record starts (0 for parquet/arrow rows)
    id: str | None = None
    form: str = "input-output"  # input-output | messages | prompt-completion
    first_response: int = 0  # prompt-completion conversations: the completion's first message
    place: str = ""  # "line N", or "row N of FILE" for parquet/arrow

    @classmethod
    def pair(cls, input: str, output: str | None, number: int, line: int, id: str | None = None,
             form: str = "input-output", place: str = "") -> "Record":
        messages = (Message("user", input),) + ((Message("assistant", output),) if output is not None else ())
        return cls(messages, number, line, id, form, 0, place or f"line {line}")

    @property
    def where(self) -> str:
        return f"record {self.number} ({self.place or f'line {self.line}'})"

    @property
    def response_turns(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.first_response, len(self.messages)) if self.messages[i].role == "assistant")

    @property
    def is_pair(self) -> bool:
        """One user turn and at most one answer, no system turn: raw text formatting applies."""
        return tuple(m.role for m in self.messages) in (("user",), ("user", "assistant"))

    @property
    def input(self) -> str:
        """The prompt text of a single-turn record (for a conversation: its last user turn)."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    @property
    def output(self) -> str | None:
        """The last assistant turn, None when there is none."""
        return next((m.content for m in reversed(self.messages) if m.role == "assistant"), None)

    def chat(self, end: int | None = None) -> list[dict]:
        """messages[:end] as the dicts `apply_chat_template` takes."""
        return [m._asdict() for m in self.messages[:end]]


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


def _messages(value, where: str, key: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(f'{where}: "{key}" must be a non-empty list of {{"role", "content"}} messages, got {got}')
    out = []
    for i, m in enumerate(value):
        at = f'{where}: "{key}"[{i}]'
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = f"keys {sorted(m)[:10]}" if isinstance(m, dict) else type(m).__name__
            raise DataError(f'{at}: expected a {{"role", "content"}} message, got {got}')
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f'{at}: "content" must be a string, got {type(content).__name__}')
        if role != "system" and not content.strip():
            raise DataError(f'{at}: the {role} turn is empty')
        out.append(Message(role, content))
    return tuple(out)


def _conversation(messages: tuple[Message, ...], where: str) -> None:
    roles = [m.role for m in messages]
    if "system" in roles[1:]:
        raise DataError(f"{where}: a system turn at message {roles.index('system', 1)}; it may only open the "
                        "conversation")
    first = 1 if roles[0] == "system" else 0
    if first >= len(roles) or roles[first] != "user":
        raise DataError(f"{where}: the conversation must start with a user turn (after an optional system turn), "
                        f"got roles {roles[:4]}")


def _text(obj: dict, key: str, where: str, required: bool) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: \"{key}\" is empty")
    return value


def parse_record(obj, number: int, line: int, place: str, where: str, require_output: bool) -> Record:
    """The record of one parsed JSON object or table row; DataError names `where` and what was expected."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with \"input\" and \"output\", \"messages\", or \"prompt\" and "
                        f"\"completion\", got {type(obj).__name__}")
    rid = obj.get("id") if isinstance(obj.get("id"), str) else None
    if "messages" in obj:
        messages, form, first = _messages(obj["messages"], where, "messages"), "messages", 0
    elif "prompt" in obj:
        prompt, completion, form = obj["prompt"], obj.get("completion"), "prompt-completion"
        if completion is None and require_output:
            raise DataError(f"{where}: missing \"completion\" (keys present: {sorted(obj)[:10]})")
        if isinstance(prompt, str):
            if completion is not None and not isinstance(completion, str):
                raise DataError(f"{where}: \"prompt\" is a string, so \"completion\" must be one too, got "
                                f"{type(completion).__name__}")
            return Record.pair(_text(obj, "prompt", where, True), _text(obj, "completion", where, require_output),
                               number, line, rid, form, place)
        elif isinstance(prompt, list):
            messages = _messages(prompt, where, "prompt")
            first = len(messages)
            if completion is not None:
                if not isinstance(completion, list):
                    raise DataError(f"{where}: \"prompt\" is a list of messages, so \"completion\" must be one too, "
                                    f"got {type(completion).__name__}")
                messages += _messages(completion, where, "completion")
        else:
            raise DataError(f"{where}: \"prompt\" must be a string or a list of messages, got {type(prompt).__name__}")
    else:
        keys = ("input", "output") if require_output else ("input",)
        for key in keys:
            if key not in obj:
                raise DataError(f"{where}: missing \"{key}\" (keys present: {sorted(obj)[:10]}); expected "
                                "{\"input\", \"output\"}, {\"messages\": [...]} or {\"prompt\", \"completion\"}")
        return Record.pair(_text(obj, "input", where, True), _text(obj, "output", where, require_output), number,
                           line, rid, place=place)
    _conversation(messages, where)
    record = Record(messages, number, line, rid, form, first, place)
    if require_output and not record.response_turns:
        part = "the completion" if form == "prompt-completion" else "the conversation"
        raise DataError(f"{where}: {part} has no assistant turn to train on")
    return record


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
