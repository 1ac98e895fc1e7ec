"""The HTTP routes (FastAPI): `/v1/chat/completions`, `/v1/completions` (streamed as server-sent
events or whole) and `/v1/models`, in OpenAI's schema. A request is checked here (4xx with OpenAI's
error body), tokenized, and handed to the Batcher; its events come back through an asyncio queue.
A client that goes away cancels its request, and the batcher drops that row."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mtp_jax.decoding.request import encode_chat
from mtp_jax.decoding.sampling import Sampling
from mtp_jax.serve import protocol
from mtp_jax.serve.batcher import Batcher, Delta, Failure, Finish
from mtp_jax.serve.batcher import Request as Job
from mtp_jax.serve.protocol import ChatRequest, CompletionRequest, RequestError


def create_app(batcher: Batcher, model_id: str, default_max_tokens: int = 256) -> FastAPI:
    """The server's app; its lifespan starts and stops `batcher`'s thread. `default_max_tokens`:
    a request's token limit where it names none (less where the context is shorter)."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="mtp-jax", lifespan=lifespan)
    app.state.batcher = batcher
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def refused(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):  # unknown route, wrong method: still OpenAI's error body
        return JSONResponse(RequestError(str(exc.detail), exc.status_code).body(), status_code=exc.status_code)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "mtp-jax", "decoding": batcher.decoding,
                                            "max_batch": batcher.max_batch,
                                            "batching": dict(batcher.stats)}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(batcher, model_id, default_max_tokens, ChatRequest, await request.body())

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(batcher, model_id, default_max_tokens, CompletionRequest, await request.body())

    return app


def prompt_tokens(tokenizer, vocab_size: int, body: ChatRequest | CompletionRequest) -> list[int]:
    """The request's prompt as token ids; RequestError for one that cannot be one."""
    if isinstance(body, ChatRequest):
        if not tokenizer.chat_template:
            raise RequestError("the model's tokenizer has no chat template: use /v1/completions", param="messages")
        try:
            ids = encode_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        except Exception as e:  # the template refused the conversation (jinja's raise_exception)
            raise RequestError(f"messages: the chat template refused them: {e}", param="messages") from None
    elif isinstance(body.prompt, str) or (body.prompt and all(isinstance(p, str) for p in body.prompt)):
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(texts) != 1:
            raise RequestError(f"prompt: {len(texts)} prompts; send one per request", param="prompt")
        ids = tokenizer(texts[0], add_special_tokens=True)["input_ids"]
    else:
        ids = list(body.prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})", param="prompt")
    if not ids:
        raise RequestError("the prompt is empty", param="messages" if isinstance(body, ChatRequest) else "prompt")
    return ids


def _job(batcher: Batcher, default_max_tokens: int, body, emit) -> Job:
    """The checked request for the batcher."""
    body.check_supported()
    stop = body.stop_strings()
    prompt = prompt_tokens(batcher.tokenizer, batcher.model.config.vocab_size, body)
    max_tokens = body.token_limit()
    if max_tokens is None:
        max_tokens = default_max_tokens
        while max_tokens > 1 and not batcher.fits(len(prompt), max_tokens):
            max_tokens //= 2
    if not batcher.fits(len(prompt), max_tokens):
        prompt_field = "messages" if isinstance(body, ChatRequest) else "prompt"
        raise RequestError(f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) exceed the model's "
                           f"context of {batcher.max_positions} tokens",
                           param="max_tokens" if batcher.fits(len(prompt), 1) else prompt_field,
                           code="context_length_exceeded")
    # greedy ignores top_p: one Sampling for every greedy request, so they share batches and programs
    sampling = Sampling(body.temperature, 0, body.top_p) if body.temperature > 0 else Sampling()
    return Job(prompt, max_tokens, sampling, stop, emit)


async def _complete(batcher: Batcher, model_id: str, default_max_tokens: int, cls, raw: bytes):
    body = protocol.parse(cls, raw)
    if body.model is not None and body.model != model_id:
        raise RequestError(f"model {body.model!r} does not exist; this server serves {model_id!r}", 404,
                           param="model", code="model_not_found")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event):  # from the batcher's thread
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = _job(batcher, default_max_tokens, body, emit)
    chat, rid = cls is ChatRequest, protocol.new_id("chatcmpl" if cls is ChatRequest else "cmpl")
    batcher.submit(job)
    if body.stream:
        with_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(job, events, chat, rid, model_id, with_usage),
                                 media_type="text/event-stream")
    try:
        parts = []
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failure):
                raise RequestError(event.message, 500, kind="server_error")
            else:
                return protocol.completion(chat, rid, model_id, "".join(parts), event.reason, _usage(job, event))
    finally:
        job.cancel()  # a no-op once finished; drops the row if the handler was cancelled


async def _stream(job: Job, events: asyncio.Queue, chat: bool, rid: str, model_id: str, with_usage: bool):
    """The SSE events of a streamed request; leaving early (a client gone) cancels the request."""
    try:
        if chat:
            yield protocol.chunk(chat, rid, model_id, "", first=True)
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield protocol.chunk(chat, rid, model_id, event.text)
            elif isinstance(event, Failure):
                yield f"data: {json.dumps(RequestError(event.message, 500, kind='server_error').body())}\n\n"
                break
            else:
                assert isinstance(event, Finish)
                yield protocol.chunk(chat, rid, model_id, None if chat else "", finish_reason=event.reason)
                if with_usage:
                    yield protocol.chunk(chat, rid, model_id, None, use=_usage(job, event))
                break
        yield protocol.DONE
    finally:
        job.cancel()


def _usage(job: Job, event: Finish) -> dict:
    return protocol.usage(len(job.prompt), event.completion_tokens, event.calls, event.acceptance)
