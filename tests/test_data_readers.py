"""Readers: the three file shapes, streaming over tiny chunks, and bad records at chunk boundaries
(missing, empty and directory paths: tests/bad_inputs/)."""

import json

import pytest

import mtp_jax.data.readers as readers
from mtp_jax.data.readers import DataError, ReadStats, read_records

RECS = [{"input": f"question {i} \u00e9\u4e2d", "output": "answer " * (i + 1)} for i in range(20)]


def pairs(records):
    return [(r.input, r.output) for r in records]


def expected():
    return [(r["input"], r["output"]) for r in RECS]


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch):
    # records and even characters straddle chunk boundaries: the streaming path is what runs
    monkeypatch.setattr(readers, "CHUNK_CHARS", 7)


def test_json_list(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(RECS, indent=2, ensure_ascii=False))
    assert pairs(read_records(p)) == expected()


def test_json_results_object(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"results": RECS}, ensure_ascii=False))
    assert pairs(read_records(p)) == expected()


def test_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in RECS) + "\n\n")
    out = list(read_records(p))
    assert pairs(out) == expected()
    assert out[3].number == 4 and out[3].line == 4


def test_jsonl_content_in_json_extension(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("\n".join(json.dumps(r) for r in RECS))
    assert pairs(read_records(p)) == expected()


def test_record_numbers_and_lines_in_json_list(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(RECS, indent=1))  # each record spans 4 lines, the list opens on line 1
    out = list(read_records(p))
    assert [r.line for r in out[:3]] == [2, 6, 10]


def test_builtin_files_resolve():
    out = list(read_records("builtin:train_prompts.jsonl", require_output=False))
    assert len(out) >= 300


def bad(tmp_path, text: bytes | str, name="bad.jsonl"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_bad_empty_list(tmp_path):
    with pytest.raises(DataError, match="no records"):
        list(read_records(bad(tmp_path, "[ ]", "bad.json")))


def test_bad_invalid_json_at_record_n_in_list(tmp_path):
    text = json.dumps(RECS[:5], indent=1).replace('"question 3', 'question 3')
    with pytest.raises(DataError, match=r"bad.json: record 4 \(line 15\): invalid JSON"):
        list(read_records(bad(tmp_path, text, "bad.json")))


def test_bad_invalid_json_at_record_n_in_jsonl_error_and_skip(tmp_path):
    lines = [json.dumps(r) for r in RECS[:5]]
    lines[2] = lines[2][:-3]
    p = bad(tmp_path, "\n".join(lines))
    with pytest.raises(DataError, match=r"bad.jsonl: record 3 \(line 3\): invalid JSON"):
        list(read_records(p))
    stats = ReadStats()
    assert len(list(read_records(p, "skip", stats))) == 4
    assert stats.skipped == 1 and "record 3" in stats.skipped_examples[0]


def test_bad_missing_output(tmp_path):
    p = bad(tmp_path, json.dumps({"input": "q"}) + "\n")
    with pytest.raises(DataError, match=r"record 1 \(line 1\): missing \"output\""):
        list(read_records(p))


def test_bad_non_string_fields(tmp_path):
    p = bad(tmp_path, json.dumps({"input": "q", "output": 3}) + "\n" + json.dumps({"input": ["q"], "output": "a"}))
    with pytest.raises(DataError, match=r"record 1 .*\"output\" must be a string, got int"):
        list(read_records(p))
    stats = ReadStats()
    assert list(read_records(p, "skip", stats)) == []
    assert stats.skipped == 2 and "\"input\" must be a string, got list" in stats.skipped_examples[1]


def test_bad_not_an_object(tmp_path):
    with pytest.raises(DataError, match=r"record 2 .*expected an object"):
        list(read_records(bad(tmp_path, json.dumps([RECS[0], "text"]), "bad.json")))


def test_bad_empty_strings(tmp_path):
    p = bad(tmp_path, json.dumps({"input": "q", "output": "  "}) + "\n" + json.dumps({"input": "", "output": "a"}))
    with pytest.raises(DataError, match=r"record 1 .*\"output\" is empty"):
        list(read_records(p))
    stats = ReadStats()
    assert list(read_records(p, "skip", stats)) == [] and stats.skipped == 2


def test_bad_non_utf8_jsonl_line(tmp_path):
    p = bad(tmp_path, json.dumps(RECS[0]).encode() + b"\n" + b'{"input": "q\xff\xfe", "output": "a"}\n')
    with pytest.raises(DataError, match=r"record 2 \(line 2\): invalid UTF-8"):
        list(read_records(p))
    assert len(list(read_records(p, "skip"))) == 1


def test_bad_non_utf8_json_list(tmp_path):
    text = json.dumps(RECS[:3], indent=1).encode().replace(b"question 2", b"question \xc3\x28")
    with pytest.raises(DataError, match=r"bad.json: invalid UTF-8 at byte \d+"):
        list(read_records(bad(tmp_path, text, "bad.json")))


def test_one_megabyte_record_streams(tmp_path):
    big = {"input": "q", "output": "word " * 200_000}  # 1 MB in one record, parsed over 7-char chunks
    p = bad(tmp_path, json.dumps([RECS[0], big, RECS[1]]), "big.json")
    out = list(read_records(p))
    assert len(out) == 3 and len(out[1].output) == 1_000_000
