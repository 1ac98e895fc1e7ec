"""benchmarks/draft_vocab.py --smoke: its coverage figures against a count made here from the tokenizer alone:
the list is the top-N ids (ties by id) of the training responses as the chat template renders them (what
follows the generation prompt, the template's text after EOS included), the held-out sequences each output's
tokens and EOS (what a decoder emits)."""

import collections
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import draft_vocab  # noqa: E402


def test_smoke_coverage_equals_a_direct_count(tmp_path):
    from mtp_jax.models import load_tokenizer

    report = draft_vocab.main(["--smoke", "--out", str(tmp_path / "r.json")])
    tok = load_tokenizer("smollm2-135m-instruct")
    records = draft_vocab.smoke_records()

    def response(r):
        user = [{"role": "user", "content": r["input"]}]
        prompt = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": r["output"]}], return_dict=False)
        assert full[:len(prompt)] == prompt
        return full[len(prompt):]

    train = [response(r) for i, r in enumerate(records) if i % draft_vocab.HOLD_OUT_EVERY]
    held = [tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for i, r in enumerate(records) if not i % draft_vocab.HOLD_OUT_EVERY]
    counts = collections.Counter(t for s in train for t in s)
    assert (report["train_records"], report["held_out_tokens"]) == (len(train), sum(map(len, held)))
    for row in report["rows"]:
        top = set(sorted(counts, key=lambda t: (-counts[t], t))[:row["size"]])
        tokens = sum(t in top for s in held for t in s) / sum(map(len, held))
        windows = [all(t in top for t in s[j:j + 4]) for s in held for j in range(len(s) - 3)]
        assert row["token_coverage"] == pytest.approx(tokens, abs=1e-4)
        assert row["window_coverage"] == pytest.approx(sum(windows) / len(windows), abs=1e-4)
    assert report["rows"][0]["token_coverage"] < 1.0, "the smoke list is meant to miss some tokens"
