"""Self-distillation with the real SmolLM2 on three prompts: records, resume after a torn line, no duplicates."""

import json

import pytest

from mtp_jax.data.distill import load_done, run_distill
from mtp_jax.data.readers import DataError, read_records


@pytest.fixture(scope="module")
def smollm2():
    from mtp_jax.models import load_model, load_tokenizer

    model, params, config = load_model("smollm2-135m-instruct")
    return model, params, config, load_tokenizer("smollm2-135m-instruct")


def test_distill_resumes_without_duplicates(tmp_path, smollm2):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": p}) + "\n" for p in
                               ["What is 2 + 3?", "Name a prime number.", "Write a Python hello world."]))
    out = tmp_path / "out.jsonl"
    stats = run_distill(*smollm2, prompts, out, max_new_tokens=4, batch_size=1, limit=2, progress=False)
    assert stats.generated == 2
    with open(out, "a") as f:  # a run killed mid-write leaves a torn last line (batch 1: one compiled shape)
        f.write('{"id": "3-abc", "input": "Write a Py')
    stats = run_distill(*smollm2, prompts, out, max_new_tokens=4, batch_size=1, progress=False)
    assert (stats.already_done, stats.generated) == (2, 1)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and len({r["id"] for r in records}) == 3, "duplicated or lost prompts"
    assert {r["input"] for r in records} == {r.input for r in read_records(prompts, require_output=False)}
    assert all(r["output"] and r["stop"] in ("eos", "length") for r in records)
    assert len(list(read_records(out))) == 3, "distill output is not a valid training file"
    assert run_distill(*smollm2, prompts, out, max_new_tokens=4, progress=False).generated == 0


def test_damaged_middle_line_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "input": "x", "output": "y"}\nnot json\n{"id": "b", "input": "x", "output": "y"}\n')
    with pytest.raises(DataError, match="damaged line"):
        load_done(out)


CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "It is five."}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "It is eight."}]


def greedy_turn(smollm2, messages, n=4):
    """The reference: plain greedy decoding of the chat-template prompt, as text."""
    from mtp_jax.decoding.plain import generate
    from mtp_jax.decoding.request import eos_ids_of

    model, params, config, tok = smollm2
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    eos = eos_ids_of(tok, config)
    return tok.decode(generate(model, params, [prompt], n, eos, pad_id=eos[0])[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("all_turns", [False, True])
def test_distill_conversations(tmp_path, smollm2, all_turns):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": CONVERSATION}) + "\n"
                       + json.dumps({"messages": CONVERSATION[:2]}) + "\n")  # ends with a user turn: a new answer
    out = tmp_path / "out.jsonl"
    stats = run_distill(*smollm2, prompts, out, max_new_tokens=4, batch_size=1, progress=False, all_turns=all_turns)
    assert (stats.generated, stats.turns) == (2, 3 if all_turns else 2)
    short, full = sorted((json.loads(line)["messages"] for line in out.read_text().splitlines()), key=len)
    assert [m["role"] for m in full] == [m["role"] for m in CONVERSATION] and len(short) == 3
    assert short[2]["content"] == greedy_turn(smollm2, CONVERSATION[:2])
    if all_turns:
        assert full[2]["content"] == greedy_turn(smollm2, CONVERSATION[:2]), "first turn not regenerated"
        assert full[4]["content"] == greedy_turn(smollm2, full[:4]), "second turn must answer the regenerated first"
    else:
        assert full[:4] == CONVERSATION[:4], "only the last assistant turn is regenerated"
        assert full[4]["content"] == greedy_turn(smollm2, CONVERSATION[:4])
    assert [r.form for r in read_records(out)] == ["messages"] * 2, "distill output is not a valid training file"
    again = run_distill(*smollm2, prompts, out, max_new_tokens=4, progress=False, all_turns=all_turns)
    assert again.generated == 0, "a rerun must find every conversation done"
