"""The OpenAI wire format the server speaks: request bodies (validated strictly, as OpenAI does: a
string is no number), the error body, and the response and stream-chunk objects."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # unknown fields are ignored (clients send many); known ones must have the right JSON type
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampled(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default: sampled
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise RequestError("stop: up to 4 non-empty strings", param="stop")
        return tuple(stop)

    def check_supported(self) -> None:
        if self.n != 1:
            raise RequestError(f"n = {self.n}: this server returns one choice per request (n = 1)", param="n")
        if self.logprobs:
            raise RequestError("logprobs are not supported by this server", param="logprobs")


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int]

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse(cls: type[_Sampled], body: bytes) -> _Sampled:
    """The request `cls` from a JSON body; RequestError (400) names the first field that is wrong."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise RequestError(f"the body is not valid JSON: {err['msg']}") from None
        loc = ".".join(str(x) for x in err["loc"])
        raise RequestError(f"{loc or 'body'}: {err['msg']}", param=loc or None) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, calls: int, acceptance: list[float]) -> dict:
    """OpenAI's usage plus this server's figures: tokens per model call and, per draft position j, the
    share of the calls offering a j-th draft in which drafts 1..j were all accepted (`acceptance`,
    left out where no draft was offered at all: plain decoding)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "tokens_per_call": completion_tokens / max(calls, 1), "model_calls": calls}
    if acceptance:
        out["acceptance"] = acceptance
    return out


def completion(chat: bool, rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    """The whole (non-streamed) response object."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish_reason: str | None = None,
          use: dict | None = None, first: bool = False) -> str:
    """One SSE event of a streamed response: a text delta, the finish reason, or (text None) the usage."""
    if text is None and finish_reason is None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": choices}
    if use is not None:
        obj["usage"] = use
    return f"data: {json.dumps(obj)}\n\n"


DONE = "data: [DONE]\n\n"
