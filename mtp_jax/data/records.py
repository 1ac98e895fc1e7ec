"""Training records: one conversation each, parsed from the JSON forms a data file may hold
({"input", "output"}, {"messages": [...]}, {"prompt", "completion"}); every problem is a `DataError`
naming where it is."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

ROLES = ("system", "user", "assistant")


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
