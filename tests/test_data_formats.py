"""Record formats: conversations (every assistant turn a response, spans checked against prefix renders of
SmolLM2's chat template), prompt-completion, parquet and arrow files and save_to_disk directories, and
the per-format counts of `python -m mtp_jax.data`."""

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mtp_jax.data.readers as readers
from mtp_jax.data import DataConfig, make_batches, prepare
from mtp_jax.data.__main__ import main as data_main
from mtp_jax.data.readers import ReadStats, read_records
from mtp_jax.data.records import DataError, Record
from mtp_jax.data.tokenize import TokenizeParams, tokenize_records

CHAT = TokenizeParams("chat", 512, 1024)
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
]
PAIRS = [{"input": f"question {i}", "output": "answer " * (i + 1)} for i in range(7)]


@pytest.fixture(scope="module")
def tok():
    from mtp_jax.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def ids(tok, messages, **kw):
    return list(tok.apply_chat_template(messages, return_dict=False, **kw))


def one(tok, record, params=CHAT):
    ex = tokenize_records(tok, [record], params, "f")[0]
    assert not isinstance(ex, DataError), ex
    return ex


def conversation_record(messages, **kw):
    return readers.parse_record({"messages": messages, **kw}, 1, 1, "line 1", "f: record 1 (line 1)", True)


def test_multi_turn_spans_are_the_assistant_turns(tok):
    ex = one(tok, conversation_record(CONVERSATION))
    assert ex.tokens.tolist() == ids(tok, CONVERSATION), "tokens differ from apply_chat_template(conversation)"
    assert len(ex.spans) == 2, "one response span per assistant turn"
    for (start, end), i in zip(ex.spans, (2, 4)):
        # independent references: the token counts of the prefix renders themselves
        assert start == len(ids(tok, CONVERSATION[:i], add_generation_prompt=True)), f"turn {i} starts elsewhere"
        assert end == len(ids(tok, CONVERSATION[:i + 1])), f"turn {i} ends elsewhere"
        text = tok.decode(ex.tokens[start:end])
        assert text.startswith(CONVERSATION[i]["content"]) and tok.eos_token in text, text
    outside = tok.decode(ex.tokens[~ex.response_mask])
    for m in CONVERSATION:
        assert (m["content"] in outside) == (m["role"] != "assistant"), f"{m['role']} turn on the wrong side"


def test_system_turn_replaces_the_default_one(tok):
    with_system = one(tok, conversation_record(CONVERSATION[:3]))
    without = one(tok, conversation_record(CONVERSATION[1:3]))
    assert "one short sentence" in tok.decode(with_system.tokens[:with_system.prompt_len])
    assert "one short sentence" not in tok.decode(without.tokens)
    assert tok.decode(with_system.tokens[with_system.spans[0][0]:with_system.spans[0][1]]) == \
        tok.decode(without.tokens[without.spans[0][0]:without.spans[0][1]])


def test_single_turn_messages_equal_input_output(tok):
    a = one(tok, conversation_record(CONVERSATION[1:3]))
    b = one(tok, Record.pair(CONVERSATION[1]["content"], CONVERSATION[2]["content"], 1, 1))
    assert a.tokens.tolist() == b.tokens.tolist() and a.spans == b.spans


def test_template_that_rewrites_past_turns_ends_them_at_eos(tok):
    # Qwen3-style: the last assistant turn carries an (empty) think block, past turns do not, so the render
    # of messages[:i+1] is no prefix of the whole conversation and a past turn ends at its EOS token
    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ex = one(t, conversation_record(CONVERSATION))
    (s1, e1), (s2, e2) = ex.spans
    assert t.decode(ex.tokens[s1:e1]) == CONVERSATION[2]["content"] + t.eos_token, "past turn must end at its EOS"
    assert t.decode(ex.tokens[s2:e2]) == "<think></think>" + CONVERSATION[4]["content"] + t.eos_token + "\n"


def test_prompt_completion_strings_equal_input_output(tmp_path, tok):
    p = tmp_path / "pc.jsonl"
    p.write_text("".join(json.dumps({"prompt": r["input"], "completion": r["output"]}) + "\n" for r in PAIRS))
    q = tmp_path / "io.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    for fmt in ("chat", "raw"):
        params = TokenizeParams(fmt, 512, 1024)
        a = tokenize_records(tok, list(read_records(p)), params, "f")
        b = tokenize_records(tok, list(read_records(q)), params, "f")
        assert [(x.tokens.tolist(), x.spans) for x in a] == [(x.tokens.tolist(), x.spans) for x in b], fmt
    assert {r.form for r in read_records(p)} == {"prompt-completion"}


def test_prompt_completion_conversation_trains_only_the_completion(tok):
    shot = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."}]
    rec = readers.parse_record({"prompt": shot + [{"role": "user", "content": "3 + 3?"}],
                                "completion": [{"role": "assistant", "content": "6."}]}, 1, 1, "line 1", "f", True)
    ex = one(tok, rec)
    assert ex.tokens.tolist() == ids(tok, rec.chat())
    assert len(ex.spans) == 1 and tok.decode(ex.tokens[ex.spans[0][0]:ex.spans[0][1]]).startswith("6.")
    assert ex.prompt_len == len(ids(tok, rec.chat(3), add_generation_prompt=True)), "the few-shot answer trained"


def test_raw_refuses_a_conversation(tok):
    err = tokenize_records(tok, [conversation_record(CONVERSATION)], TokenizeParams("raw"), "f.jsonl")[0]
    assert isinstance(err, DataError) and "use prompt_format: chat" in str(err) and "record 1 (line 1)" in str(err)


def test_truncation_keeps_later_spans_inside_the_row(tok):
    whole = one(tok, conversation_record(CONVERSATION))
    cut = whole.spans[1][0] + 3  # inside the second answer
    ex = one(tok, conversation_record(CONVERSATION), TokenizeParams("chat", 512, cut))
    assert ex.truncated and ex.tokens.tolist() == whole.tokens.tolist()[:cut]
    assert ex.spans == (whole.spans[0], (whole.spans[1][0], cut)), "the cut answer keeps its first tokens"
    ex = one(tok, conversation_record(CONVERSATION), TokenizeParams("chat", 512, whole.spans[1][0]))
    assert ex.spans == whole.spans[:1], "an answer cut to nothing is dropped"


def test_parquet_reads_like_jsonl_in_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "ARROW_BATCH_ROWS", 3)  # records span several record batches
    rows = PAIRS + [{"messages": CONVERSATION}, {"prompt": "p", "completion": "c"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pa.table({"input": [r.get("input") for r in rows], "output": [r.get("output") for r in rows],
                      "messages": [r.get("messages") for r in rows], "prompt": [r.get("prompt") for r in rows],
                      "completion": [r.get("completion") for r in rows], "other": list(range(len(rows)))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=4)
    stats = ReadStats()
    got = list(read_records(tmp_path / "d.parquet", stats=stats))
    want = list(read_records(jsonl))
    assert [(r.messages, r.form, r.first_response) for r in got] == [(r.messages, r.form, r.first_response)
                                                                    for r in want]
    assert got[7].place == "row 8" and dict(stats.forms) == {"input-output": 7, "messages": 1,
                                                              "prompt-completion": 1}


def save_to_disk_layout(directory, tables):
    """The layout of `datasets.Dataset.save_to_disk`: arrow IPC stream shards, state.json, dataset_info.json."""
    directory.mkdir()
    files = []
    for n, table in enumerate(tables):
        name = f"data-{n:05d}-of-{len(tables):05d}.arrow"
        with pa.ipc.new_stream(str(directory / name), table.schema) as w:
            w.write_table(table, max_chunksize=2)
        files.append({"filename": name})
    (directory / "state.json").write_text(json.dumps({"_data_files": files, "_split": None}))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return directory


def test_save_to_disk_directory_in_state_order(tmp_path):
    t1 = pa.table({"messages": [CONVERSATION, CONVERSATION[1:3]]})
    t2 = pa.table({"messages": [CONVERSATION[1:3]] * 3})
    d = save_to_disk_layout(tmp_path / "ds", [t1, t2])
    out = list(read_records(d))
    assert [len(r.messages) for r in out] == [5, 2, 2, 2, 2]
    assert out[3].number == 4 and out[3].place == "row 2 of data-00001-of-00002.arrow"


def test_arrow_ipc_file_format(tmp_path):
    table = pa.table({"input": [r["input"] for r in PAIRS], "output": [r["output"] for r in PAIRS]})
    with pa.ipc.new_file(str(tmp_path / "d.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=3)
    assert [(r.input, r.output) for r in read_records(tmp_path / "d.arrow")] == \
        [(r["input"], r["output"]) for r in PAIRS]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     r"\"messages\"\[1\]: role 'bot' is not one of"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"the conversation has no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, r"a system turn at message 1"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"must start with a user turn"),
    ({"messages": "hi"}, r"\"messages\" must be a non-empty list"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     r"\"messages\"\[0\]: \"content\" must be a string, got int"),
    ({"prompt": "q"}, r"missing \"completion\""),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, r"\"completion\" must be one too"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     r"the completion has no assistant turn"),
])
def test_bad_records_name_record_and_line(tmp_path, record, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: record 2 \(line 2\): .*" + message):
        list(read_records(p))
    stats = ReadStats()
    assert len(list(read_records(p, "skip", stats))) == 1 and stats.skipped == 1


def test_bad_columnar_files(tmp_path):
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"garbage\.parquet: not a readable parquet file"):
        list(read_records(tmp_path / "garbage.parquet"))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "text.parquet")
    with pytest.raises(DataError, match=r"text\.parquet: columns \['text'\]; expected an \"input\""):
        list(read_records(tmp_path / "text.parquet"))
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (tmp_path / "dd" / "train").mkdir()
    with pytest.raises(DataError, match=r"DatasetDict directory with splits \['train'\]; point .* at one split"):
        list(read_records(tmp_path / "dd"))


def test_batches_mark_every_assistant_turn(tmp_path, tok):
    data = tmp_path / "d.jsonl"
    records = [{"messages": CONVERSATION}, {"prompt": "Hi", "completion": "Hello!"}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataConfig(train_file=str(data), eval_file=str(data), cache_dir=str(tmp_path / "cache"),
                     max_prompt_tokens=256, max_total_tokens=512, batch_size=2)
    cache = prepare(cfg, tok, 4, split="eval")
    want = {r.number: ex.response_mask for r, ex in
            zip(read_records(data), tokenize_records(tok, list(read_records(data)), CHAT, "f"))}
    assert cache.multi_span == 4 and cache.manifest["formats"]["messages"]["examples"] == 4
    masks = []
    for b in make_batches(cache, cfg, train=False):
        for r in range(b["tokens"].shape[0]):
            for seg in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
                masks.append(b["response_mask"][r][b["segment_ids"][r] == seg])
    assert sorted(m.tolist() for m in masks) == sorted(m.tolist() for m in want.values())
    with pytest.raises(DataError, match="mtp.prefix_split needs one response per example"):
        prepare(cfg, tok, 4, split="eval", one_span=True)


def test_cli_reports_counts_per_format(tmp_path, capsys):
    msgs = tmp_path / "messages.jsonl"
    msgs.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(3)))
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": r["input"], "completion": r["output"]}) + "\n" for r in PAIRS))
    pq.write_table(pa.table({"input": [r["input"] for r in PAIRS], "output": [r["output"] for r in PAIRS]}),
                   tmp_path / "d.parquet")
    for path, form, n in ((msgs, "messages", 3), (pc, "prompt-completion", 7), (tmp_path / "d.parquet",
                                                                                  "input-output", 7)):
        assert data_main(["--data.train_file", str(path), "--data.eval_file", "null",
                          "--data.cache_dir", str(tmp_path / "cache")]) == 0
        out = capsys.readouterr().out
        assert f"train: {n} examples" in out and f"  {form}: {n} examples, " in out, out
        anchors = int(out.split(f"  {form}: {n} examples, ")[1].split(" anchors")[0])
        assert anchors > 0
