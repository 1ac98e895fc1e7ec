"""The OpenAI-compatible server (mtp_jax.serve) over real HTTP (httpx) against a tiny trained run,
served in-process on 127.0.0.1: greedy output is plain greedy decoding of the same chat-templated
prompt (mtp_jax.decoding.plain, an independent decoder), streamed text is the whole text, concurrent
requests share a batch and each still gets its own output, usage holds the request's own speculative
figures, bad requests get 4xx with OpenAI's error body, and a client that leaves mid-stream does not
stop the server. Every request loop is bounded in count and time."""

import collections
import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import jax
import numpy as np
import pytest
import uvicorn

from conftest import make_hf_model, save_hf
from mtp_jax.decoding.adapter import load_adapter
from mtp_jax.decoding.plain import generate
from mtp_jax.decoding.request import encode_chat, eos_ids_of
from mtp_jax.decoding.speculative import speculative_generate
from mtp_jax.models import load_model
from mtp_jax.serve.__main__ import build_app
from mtp_jax.serve.batcher import TextStream
from test_export import TOKENIZER_SIZE, tiny_tokenizer, train_run
from test_train import COMPILE_CACHE, write_data

MAX = 16  # max_tokens of most requests: one decode-length bucket, one compiled program per batch size
TIMEOUT = 120.0  # seconds any one HTTP call may take (the first ones compile)
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}Answer: {% endif %}"
QUESTIONS = ["What is two plus two?", "Name a color.", "Write hello in Python.", "Count to five."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run on a tiny Llama whose word-level tokenizer has a chat template, and the references."""
    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    tmp = tmp_path_factory.mktemp("serve")
    data = write_data(tmp / "train.jsonl")
    base = save_hf(make_hf_model("llama"), tmp / "base")
    tok = tiny_tokenizer(TOKENIZER_SIZE["llama"], [v for line in open(data) for v in json.loads(line).values()])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    run_dir = train_run(tmp, str(base), data)
    lm, base_params, config = load_model(str(base))
    return SimpleNamespace(run_dir=run_dir, data=data, tok=tok, lm=lm, base=base_params, eos=eos_ids_of(tok, config))


def chat_ids(trained, question):
    return encode_chat(trained.tok, [{"role": "user", "content": question}])


def plain_text(trained, questions, max_tokens=MAX):
    """Plain greedy decoding of the chat-templated questions, decoded to text."""
    outs = generate(trained.lm, trained.base, [chat_ids(trained, q) for q in questions], max_tokens, trained.eos)
    return [trained.tok.decode(o, skip_special_tokens=True) for o in outs]


@contextlib.contextmanager
def serving(app):
    """`app` on a free 127.0.0.1 port in a thread, and an httpx client for it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start within 60 s"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=TIMEOUT) as client:
            yield client
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(trained):
    """The speculative server (max_batch 4; the engine waits 0.3 s for more requests before a batch, so
    requests sent together share one; 3 model calls a read)."""
    with serving(build_app(trained.run_dir, max_batch=4, batch_wait_s=0.3, default_max_tokens=MAX,
                           calls_per_read=3)) as client:
        yield SimpleNamespace(client=client, model=trained.run_dir.name)


@pytest.fixture(scope="module")
def plain_server(trained):
    """The same run served with `decoding="plain"` (its base model alone), batched alike, 2 calls a read."""
    app = build_app(trained.run_dir, max_batch=4, batch_wait_s=0.3, default_max_tokens=MAX, decoding="plain",
                    calls_per_read=2)
    with serving(app) as client:
        yield SimpleNamespace(client=client, model=trained.run_dir.name)


def chat(server, question, **kw):
    body = {"model": server.model, "messages": [{"role": "user", "content": question}], "max_tokens": MAX,
            "temperature": 0.0, **kw}
    return server.client.post("/v1/chat/completions", json=body)


def stream_events(response) -> list:
    """The JSON objects of an SSE response, checking it ends with `data: [DONE]`."""
    lines = [line for line in response.iter_lines() if line]
    assert lines and lines[-1] == "data: [DONE]", f"the stream does not end with [DONE]: {lines[-3:]}"
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_greedy_chat_is_plain_greedy_decoding(server, trained):
    r = chat(server, QUESTIONS[0])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == server.model
    assert out["choices"][0]["message"] == {"role": "assistant", "content": plain_text(trained, QUESTIONS[:1])[0]}
    # usage: this request's own figures, as speculative decoding of its prompt alone gives them
    ids = chat_ids(trained, QUESTIONS[0])
    model, params, _ = load_adapter(trained.run_dir)
    ref = speculative_generate(model, params, [ids], MAX, trained.eos)
    use = out["usage"]
    assert (use["prompt_tokens"], use["completion_tokens"]) == (len(ids), len(ref.tokens[0]))
    assert use["total_tokens"] == len(ids) + len(ref.tokens[0])
    assert use["model_calls"] == ref.steps[0] and use["tokens_per_call"] == pytest.approx(ref.tokens_per_step)
    np.testing.assert_allclose(use["acceptance"], ref.acceptance, err_msg="per-position acceptance")
    assert out["choices"][0]["finish_reason"] == ("stop" if ref.tokens[0][-1] in trained.eos else "length")


def test_drafting_vocabulary_from_the_runs_token_counts(trained, tmp_path):
    """The run's token_counts.npy counts the training responses' tokens (each output's tokens and its
    EOS, tokenized here on their own); `load_adapter(draft_vocab=N)` drafts from the N most frequent ids
    (ties by id), and its greedy output is still plain greedy decoding's."""
    from mtp_jax.checkpoints import CheckpointError
    from mtp_jax.decoding.adapter import draft_vocabulary

    expected = collections.Counter()
    for line in open(trained.data):
        expected.update(trained.tok(json.loads(line)["output"], add_special_tokens=False)["input_ids"])
        expected[trained.tok.eos_token_id] += 1
    counts = np.load(trained.run_dir / "token_counts.npy")
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)
    top = sorted(expected, key=lambda i: (-expected[i], i))[:5]
    model, params, _ = load_adapter(trained.run_dir, draft_vocab=5)
    assert sorted(params["draft_vocab"].tolist()) == sorted(top)
    ids = [chat_ids(trained, q) for q in QUESTIONS]
    assert speculative_generate(model, params, ids, MAX, trained.eos).tokens == \
        generate(trained.lm, trained.base, ids, MAX, trained.eos)
    with pytest.raises(CheckpointError, match="token_counts.npy: missing"):
        draft_vocabulary(tmp_path, 5, 100)


def test_load_adapter_defaults_by_base_size(trained, tmp_path, monkeypatch):
    """load_adapter's defaults: a small base decodes merged over the whole vocabulary; a large one
    (`layout.SMALL_BASE_PARAMS` lowered below it) in A columns, drafting from the run's DRAFT_VOCAB most
    frequent ids, or from the whole vocabulary when the run has no token counts or DRAFT_VOCAB ids
    would not be fewer than the vocabulary's."""
    import shutil

    from mtp_jax.decoding import adapter, layout

    model, params, _ = load_adapter(trained.run_dir)
    assert layout.layout_name(model) == "merged" and "draft_vocab" not in params
    monkeypatch.setattr(layout, "SMALL_BASE_PARAMS", 0)
    monkeypatch.setattr(adapter, "DRAFT_VOCAB", 5)
    model, params, _ = load_adapter(trained.run_dir)
    assert layout.layout_name(model) == "A columns"
    assert params["draft_vocab"].tolist() == load_adapter(trained.run_dir, draft_vocab=5)[1]["draft_vocab"].tolist()
    without = tmp_path / "run"
    shutil.copytree(trained.run_dir, without)
    (without / "token_counts.npy").unlink()
    assert "draft_vocab" not in load_adapter(without)[1]
    monkeypatch.setattr(adapter, "DRAFT_VOCAB", model.config.vocab_size)
    assert "draft_vocab" not in load_adapter(trained.run_dir)[1]


def test_decoding_cli_with_a_drafting_vocabulary(trained, capsys):
    """`python -m mtp_jax.decoding --adapter RUN --draft_vocab 5` streams plain greedy decoding's text and
    says how many ids it drafted from."""
    from mtp_jax.decoding.cli import main

    assert main(["--adapter", str(trained.run_dir), "--draft_vocab", "5", "--prompt", QUESTIONS[2],
                 "--max_new_tokens", str(MAX)]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == f">>> {QUESTIONS[2]}\n{plain_text(trained, QUESTIONS[2:3])[0]}", out.out
    assert "drafts from 5 token ids" in out.err


def streamed_chat(srv, question: str) -> list[dict]:
    """The events of one greedy streamed chat completion (with the usage chunk) from server `srv`."""
    with srv.client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": question}], "max_tokens": MAX, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return stream_events(r)


def test_streamed_chat_concatenates_to_the_same_text(server, trained):
    events = streamed_chat(server, QUESTIONS[1])
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == plain_text(trained, QUESTIONS[1:2])[0]
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1


def test_completions_streamed_and_whole_with_a_stop_string(server, trained):
    """/v1/completions on a raw prompt; a stop string ends the text just before it, streamed or not."""
    ids = trained.tok(QUESTIONS[2], add_special_tokens=True)["input_ids"]
    full = trained.tok.decode(generate(trained.lm, trained.base, [ids], MAX, trained.eos)[0],
                              skip_special_tokens=True)
    words = full.split()
    assert len(words) > 4, f"reference too short to cut: {full!r}"
    stop = " ".join(words[3:5])  # spans tokens; the first occurrence is at or before words[3]
    want = full[:full.find(stop)]
    body = {"prompt": QUESTIONS[2], "max_tokens": MAX, "temperature": 0.0, "stop": [stop]}
    whole = server.client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion"
    assert (whole["choices"][0]["text"], whole["choices"][0]["finish_reason"]) == (want, "stop")
    with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = stream_events(r)
    assert "".join(e["choices"][0]["text"] for e in events) == want
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_share_a_batch(server, trained):
    before = server.client.get("/v1/models").json()["data"][0]["batching"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda q: chat(server, q), QUESTIONS))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    texts = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert texts == plain_text(trained, QUESTIONS), "a batched request's output differs from plain greedy"
    after = server.client.get("/v1/models").json()["data"][0]["batching"]
    assert after["requests"] - before["requests"] == 4
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < 4, f"no batch held >1: {after}"


def test_greedy_requests_share_a_batch_whatever_their_top_p(server, trained):
    """top_p means nothing to greedy decoding: requests differing only in it run as one batch (one
    program), each with plain greedy decoding's text."""
    before = server.client.get("/v1/models").json()["data"][0]["batching"]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda top_p: chat(server, QUESTIONS[1], top_p=top_p), [1.0, 0.5]))
    assert [r.status_code for r in responses] == [200] * 2, [r.text for r in responses]
    texts = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert texts == plain_text(trained, QUESTIONS[1:2]) * 2
    after = server.client.get("/v1/models").json()["data"][0]["batching"]
    assert after["batches"] - before["batches"] == 1, f"greedy requests were split by top_p: {before} -> {after}"


@pytest.mark.parametrize("decoding", ["speculative", "plain"])
def test_warmed_up_engine_compiles_nothing_for_its_traffic(trained, decoding):
    """After `Batcher.warm_up(64)`, greedy batches of 1 to max_batch requests with prompts padded to
    each length up to 64 tokens and any max_tokens up to the decode length run without compiling a
    program (the jitted decoding functions' caches do not grow), and each request still gets plain
    greedy decoding's text."""
    from mtp_jax.decoding import plain, speculative
    from mtp_jax.decoding.adapter import load_base
    from mtp_jax.decoding.request import pad_id_of, padded_length
    from mtp_jax.decoding.sampling import Sampling
    from mtp_jax.serve.batcher import Batcher, Delta, Finish, Request

    lm, params, tok = (load_adapter if decoding == "speculative" else load_base)(trained.run_dir)
    # a decode length that is no power of two: requests asking for less all share it; plain mode pads
    # batches of 2 and 3 to 4 rows (batch sizes 1, 4), speculative to 2 and 4 (the default)
    sizes = None if decoding == "speculative" else (4, 1)
    batcher = Batcher(lm, params, tok, trained.eos, pad_id_of(tok, trained.eos), max_batch=4, batch_wait_s=0.05,
                      decoding=decoding, decode_length=MAX - 4, batch_sizes=sizes,
                      calls_per_read=3 if decoding == "speculative" else 1)
    rows = (1, 2, 4) if sizes is None else (1, 4)
    assert batcher.batch_sizes == rows
    assert batcher.warm_up(64, progress=False) == len(rows) * 3  # x prompts padded to 16, 32, 64
    jitted = (speculative._prefill_jit, speculative.steps_jit, plain._prefill_jit, plain._next_calls_jit)
    before = [f._cache_size() for f in jitted]
    questions = [QUESTIONS[0], " ".join(QUESTIONS * 2), QUESTIONS[2], " ".join(QUESTIONS * 3), QUESTIONS[1]]
    lengths = {padded_length(len(chat_ids(trained, q))) for q in questions}
    assert lengths == {16, 32, 64}, f"the prompts do not cover every padded length: {lengths}"
    batcher.start()
    try:
        for group, max_tokens in (([0], MAX - 4), ([1, 2], 5), ([0, 1, 3], MAX - 4), ([4, 3, 2, 1], 9)):
            texts, done = {}, {}

            def emit(i, event):
                if isinstance(event, Delta):
                    texts[i] = texts.get(i, "") + event.text
                elif isinstance(event, Finish):
                    done[i] = event
                else:
                    done[i] = event  # a Failure: the assertion below names it

            for i in group:  # queued before the engine looks: one batch
                batcher.submit(Request(chat_ids(trained, questions[i]), max_tokens, Sampling(), (),
                                       lambda event, i=i: emit(i, event)))
            deadline = time.monotonic() + TIMEOUT
            while len(done) < len(group):
                assert time.monotonic() < deadline, f"batch {group} did not finish: {done}"
                time.sleep(0.01)
            assert all(isinstance(e, Finish) for e in done.values()), done
            expected = plain_text(trained, [questions[i] for i in group], max_tokens)
            assert [texts.get(i, "") for i in group] == expected, f"batch {group}: not plain greedy's text"
    finally:
        batcher.stop()
    assert batcher.stats["largest_batch"] == 4
    assert [f._cache_size() for f in jitted] == before, "serving compiled a program the warm-up had not"


def test_sampled_request(server):
    r = chat(server, QUESTIONS[3], temperature=0.8, top_p=0.9, seed=1)
    assert r.status_code == 200, r.text
    out = r.json()
    assert 1 <= out["usage"]["completion_tokens"] <= MAX and out["choices"][0]["finish_reason"] in ("stop", "length")


def test_plain_mode_greedy_is_the_speculative_servers_and_plain_decodings(server, plain_server, trained):
    """Plain mode, 4 concurrent greedy requests (one batch): each text is plain greedy decoding's
    (decoding.plain.generate, one prompt at a time) and the speculative server's for the same request;
    usage counts one token per call and no acceptance (no drafts)."""
    assert plain_server.client.get("/v1/models").json()["data"][0]["decoding"] == "plain"
    assert server.client.get("/v1/models").json()["data"][0]["decoding"] == "speculative"
    with ThreadPoolExecutor(4) as pool:
        plain = list(pool.map(lambda q: chat(plain_server, q), QUESTIONS))
        spec = list(pool.map(lambda q: chat(server, q), QUESTIONS))
    assert [r.status_code for r in plain + spec] == [200] * 8, [r.text for r in plain + spec]
    texts = [r.json()["choices"][0]["message"]["content"] for r in plain]
    assert texts == [plain_text(trained, [q])[0] for q in QUESTIONS]
    assert texts == [r.json()["choices"][0]["message"]["content"] for r in spec]
    for r, q in zip(plain, QUESTIONS):
        use = r.json()["usage"]
        assert use["prompt_tokens"] == len(chat_ids(trained, q)) and "acceptance" not in use, use
        assert use["model_calls"] == use["completion_tokens"] >= 1 and use["tokens_per_call"] == 1.0, use
    batching = plain_server.client.get("/v1/models").json()["data"][0]["batching"]
    assert batching["largest_batch"] > 1, f"plain mode did not batch concurrent requests: {batching}"


def test_plain_mode_streams_and_samples(plain_server, trained):
    events = streamed_chat(plain_server, QUESTIONS[1])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == plain_text(trained, QUESTIONS[1:2])[0]
    assert len([e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]) > 1, \
        "the text came in one piece, not token by token"
    assert events[-1]["usage"]["tokens_per_call"] == 1.0
    r = chat(plain_server, QUESTIONS[3], temperature=0.8, top_p=0.9)
    assert r.status_code == 200, r.text
    out = r.json()
    assert 1 <= out["usage"]["completion_tokens"] <= MAX and out["choices"][0]["finish_reason"] in ("stop", "length")


BAD = {
    "missing messages": ({"max_tokens": 4}, "messages"),
    "messages not a list": ({"messages": "hi"}, "messages"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    "max_tokens 0": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    "max_tokens a string": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
    "temperature too high": ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    "n = 2": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    "prompt too long": ({"messages": [{"role": "user", "content": "hi " * 600}]}, "messages"),
    "max_tokens beyond the context": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600},
                                      "max_tokens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_400_with_an_error_body(server, case):
    body, param = BAD[case]
    r = server.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, f"{case}: {r.status_code} {r.text}"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], error


def test_other_refusals(server):
    r = server.client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = chat(server, "hi", model="gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = server.client.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = server.client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_client_leaving_mid_stream_leaves_the_server_serving(server, trained):
    """A client reads one event of a long stream and hangs up; the engine drops its row (its batch
    ends early) and the next request is answered as before."""
    with server.client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 400, "temperature": 0.0,
            "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(10):  # up to the first decoded text: the engine is decoding this request's row now
            line = next(lines)
            if line and json.loads(line[len("data: "):])["choices"][0]["delta"].get("content"):
                break
        else:
            pytest.fail("no text in the stream's first events")
    deadline = time.monotonic() + 60
    while server.client.get("/v1/models").json()["data"][0]["batching"]["cancelled"] < 1:
        assert time.monotonic() < deadline, "the engine never noticed the client had gone"
        time.sleep(0.1)
    r = chat(server, QUESTIONS[0])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == plain_text(trained, QUESTIONS[:1])[0]


class _Chars:
    """A tokenizer whose tokens are characters (decode joins them): TextStream's rules in isolation."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i or not skip_special_tokens)  # 0: EOS


@pytest.mark.parametrize("pieces,stop,sent_after,stopped", [
    (["ab", "cS", "TOPd"], ["STOP"], ["ab", "abc", "abc"], True),  # a stop string split over calls
    (["ab", "cS", "Td"], ["STOP"], ["ab", "abc", "abcSTd"], False),  # a start that turned out not to be one
    (["ab", "c\ufffd", "d"], [], ["ab", "abc", "abc\ufffdd"], False),  # a half character waits
])
def test_text_stream_holds_back_what_may_change(pieces, stop, sent_after, stopped):
    ts, sent, hit = TextStream(_Chars(), stop), "", False
    for piece, want in zip(pieces, sent_after):
        delta, hit = ts.add([ord(c) for c in piece])
        sent += delta + ("" if hit or piece != pieces[-1] else ts.flush())
        assert sent == want, f"after {piece!r}"
    assert hit == stopped



def test_each_request_gets_its_own_rows_figures():
    """A request's usage: its own row's calls and accepted / offered drafts at the call where it ended
    (here a stop string for one, EOS for the other), not another row's. Synthetic calls, since the tiny
    run's drafts are never accepted, so the HTTP tests see zero acceptance only."""
    from mtp_jax.decoding.sampling import Sampling
    from mtp_jax.decoding.speculative import StreamCall
    from mtp_jax.serve.batcher import Batcher, Delta, Finish, Request

    stub = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    batcher = Batcher(stub, {}, _Chars(), eos_ids=[0], pad_id=0)
    got = [[], []]
    reqs = [Request([1], 9, Sampling(), ("!",), got[0].append), Request([1], 9, Sampling(), (), got[1].append)]
    texts = [TextStream(_Chars(), r.stop) for r in reqs]
    chars = lambda s: [ord(c) for c in s]
    calls = [StreamCall([chars("a"), chars("x")], np.array([1, 1]), np.zeros((2, 2)), np.zeros((2, 2)),
                        np.array([False, False])),
             StreamCall([chars("b!c"), chars("yz") + [0]], np.array([2, 2]), np.array([[1, 0], [1, 1]]),
                        np.array([[1, 1], [1, 1]]), np.array([False, True])),
             StreamCall([chars("de"), []], np.array([3, 2]), np.array([[1, 1], [1, 1]]),
                        np.array([[2, 2], [1, 1]]), np.array([False, True]))]
    live = [True, True]
    for call in calls:
        live = [ok and batcher._advance(r, texts[i], call, i) for i, (r, ok) in enumerate(zip(reqs, live))]
    assert live == [False, False]
    assert got[0] == [Delta("a"), Delta("b"), Finish("stop", 4, 2, [1.0, 0.0])], got[0]
    assert got[1] == [Delta("x"), Delta("yz"), Finish("stop", 4, 2, [1.0, 1.0])], got[1]


def test_cli_help_and_a_bad_run(tmp_path, capsys):
    import subprocess
    import sys

    from mtp_jax.serve.__main__ import main

    done = subprocess.run([sys.executable, "-m", "mtp_jax.serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "/v1/chat/completions" in done.stdout
    assert "--max_batch" in done.stdout and "--decoding" in done.stdout
    assert main(["--adapter", str(tmp_path)]) == 2, "a directory that is no run was not refused"
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a training run directory" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["--adapter", str(tmp_path), "--dtype", "nonsense"])
    assert exit_.value.code == 2 and "--dtype nonsense: not a dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--adapter", str(tmp_path), "--max_batch", "8", "--batch_sizes", "1,4"])
    assert exit_.value.code == 2 and "largest is max_batch (8)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--adapter", str(tmp_path), "--decoding", "plain", "--draft_vocab", "100"])
    assert exit_.value.code == 2 and "--decoding plain has no drafts" in capsys.readouterr().err


def test_batch_sizes():
    """Default batch sizes: powers of two below max_batch and max_batch; given ones sorted, deduplicated,
    their largest max_batch, or refused."""
    from mtp_jax.serve.batcher import batch_sizes_of

    assert batch_sizes_of(8) == (1, 2, 4, 8) and batch_sizes_of(6) == (1, 2, 4, 6) and batch_sizes_of(1) == (1,)
    assert batch_sizes_of(32, [32, 1, 1]) == (1, 32)
    for bad in ([1, 4], [0, 8], []):
        with pytest.raises(ValueError, match="largest is max_batch"):
            batch_sizes_of(8, bad)


def test_load_benchmark_smoke(trained, tmp_path, monkeypatch):
    """benchmarks/serve.py --smoke: both servers as subprocesses on 127.0.0.1, 1 and 2 clients; the report
    has a row per mode and concurrency with every request answered, and a speculative / plain row each."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", COMPILE_CACHE)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve_smoke.md"
    report = bench.main(["--adapter", str(trained.run_dir), "--smoke", "--out", str(out),
                         "--startup_timeout", "300", "--request_timeout", "120"])
    rows = {(r["mode"], r["clients"]): r for r in report["rows"]}
    assert set(rows) == {(m, c) for m in ("speculative", "plain") for c in (1, 2)}
    for (mode, c), r in rows.items():
        assert (r["requests"], r["errors"]) == (2 * c, 0), r
        assert r["tokens_per_s"] > 0 and r["latency_p50_s"] <= r["latency_p90_s"] and r["tokens_per_call"] >= 1
        assert (r["acceptance"] is None) == (mode == "plain"), r
    assert rows[("plain", 1)]["tokens_per_call"] == 1.0 and report["failures"] == []
    longest = max(len(chat_ids(trained, text)) for text in bench.read_prompts(report["prompts"], 4))
    assert report["complete"] and report["precompile"] == longest, (report["precompile"], longest)
    assert set(report["startup_s"]) == {"speculative", "plain"}, report["startup_s"]
    text = out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == report["rows"]
    for c in (1, 2):
        assert f"\n| {c} | " in text.split("## Per mode")[0], f"no speculative/plain row for {c} clients"
        for mode in ("speculative", "plain"):
            assert f"\n| {mode} | {c} | {2 * c} | 0 |" in text, f"no {mode} row for {c} clients"
