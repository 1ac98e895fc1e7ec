"""Tokenization: chat tokens equal `apply_chat_template`, raw text has one BOS, truncation policy."""

import copy

import pytest

from mtp_jax.data.records import DataError, Record
from mtp_jax.data.tokenize import Example, TokenizeParams, tokenize_records, tokenizer_fingerprint


@pytest.fixture(scope="module")
def tok():
    from mtp_jax.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def bos_tok(tok):
    """SmolLM2's tokenizer made to prepend BOS like Llama's: raw mode must not put a second one
    before the response."""
    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    bos = t.bos_token
    t.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                            special_tokens=[(bos, t.bos_token_id)])
    assert t("hi")["input_ids"][0] == t.bos_token_id
    return t


REC = [Record.pair("What is 2 + 2?", "2 + 2 = 4.", 1, 1),
       Record.pair("Write a haiku about rain.", "Soft rain on the roof.", 2, 2)]


def test_chat_tokens_match_apply_chat_template(tok):
    for r, ex in zip(REC, tokenize_records(tok, REC, TokenizeParams("chat"), "f")):
        user = [{"role": "user", "content": r.input}]
        prompt = list(tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False))
        full = list(tok.apply_chat_template(user + [{"role": "assistant", "content": r.output}], return_dict=False))
        assert ex.tokens.tolist() == full, "tokens differ from apply_chat_template([user, assistant])"
        assert ex.prompt_len == len(prompt), "prompt length differs from the generation-prompt template"
        assert tok.decode(ex.tokens[ex.prompt_len:]).startswith(r.output)


def test_raw_has_a_single_bos(bos_tok):
    ex = tokenize_records(bos_tok, REC[:1], TokenizeParams("raw"), "f")[0]
    ids = ex.tokens.tolist()
    assert ids.count(bos_tok.bos_token_id) == 1 and ids[0] == bos_tok.bos_token_id, ids
    assert ids[ex.prompt_len:] == bos_tok(REC[0].output, add_special_tokens=False)["input_ids"] + [bos_tok.eos_token_id]


def test_chat_without_template_is_an_error(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_records(t, REC, TokenizeParams("chat"), "f")


def test_truncate_keeps_prompt_end_and_cuts_response(tok):
    long = [Record.pair("one two three " * 200, "four five six " * 200, 1, 1)]
    ex = tokenize_records(tok, long, TokenizeParams("chat", max_prompt_tokens=64, max_total_tokens=100), "f")[0]
    assert isinstance(ex, Example) and ex.truncated
    assert ex.prompt_len == 64 and len(ex.tokens) == 100


def test_drop_policy_names_the_record(tok):
    long = [Record.pair("one two three " * 200, "x", 7, 9)]
    err = tokenize_records(tok, long, TokenizeParams("chat", 64, 100, "drop"), "data.jsonl")[0]
    assert isinstance(err, DataError)
    assert "data.jsonl: record 7 (line 9): prompt has" in str(err)


def test_megabyte_record_beyond_max_length(tok):
    big = [Record.pair("q", "word " * 200_000, 1, 1)]  # ~1 MB response
    ex = tokenize_records(tok, big, TokenizeParams("chat", 64, 256), "f")[0]
    assert len(ex.tokens) == 256 and ex.truncated
    err = tokenize_records(tok, big, TokenizeParams("chat", 64, 256, "drop"), "f")[0]
    assert isinstance(err, DataError) and "max_total_tokens 256" in str(err)


def test_fingerprint_sees_vocab_specials_and_template(tok, bos_tok):
    base = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(copy.deepcopy(tok)) == base
    t = copy.deepcopy(tok)
    t.chat_template = tok.chat_template.replace("helpful", "useful")
    assert tokenizer_fingerprint(t) != base, "chat template change not seen"
    assert tokenizer_fingerprint(bos_tok) != base, "post-processor (BOS) change not seen"
    t = copy.deepcopy(tok)
    t.add_tokens(["<mtp_new_token>"])
    assert tokenizer_fingerprint(t) != base, "vocab change not seen"
