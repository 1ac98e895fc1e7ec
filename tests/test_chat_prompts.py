"""benchmarks/chat_prompts.py: templated chat prompts that leave every held-out topic out."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from chat_prompts import chat_prompts, heldout_texts, named_in  # noqa: E402


def test_held_out_topics_are_left_out():
    heldout = heldout_texts()
    # topics of held-out prompts, in other words: singular for plural, one word of a pair
    assert named_in("octopuses", heldout) and named_in("an octopus", heldout)
    assert named_in("a rainbow", heldout) and named_in(("a bacterium", "a fungus"), heldout)
    assert not named_in("gravity", heldout) and not named_in(("a frog", "a toad"), heldout)
    prompts = chat_prompts(heldout)
    texts = [p for p, _ in prompts]
    assert len(texts) == len(set(texts)) > 500
    assert not set(t.lower() for t in texts) & set(heldout)
    for text, topic in prompts:
        # the whole topic phrase as words ("Rome" is not in "Romeo")
        assert not any(re.search(rf"\b{re.escape(part.lower())}\b", h) for part in topic.split(" / ")
                       for h in heldout), (text, topic)


def test_cli_writes_seeded_records(tmp_path):
    def run(name):
        out = tmp_path / name
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chat_prompts.py"), "--out", str(out),
                        "--limit", "40", "--seed", "3"], check=True, capture_output=True, text=True)
        return [json.loads(line) for line in out.read_text().splitlines()]

    first = run("a.jsonl")
    assert first == run("b.jsonl") and len(first) == 40
    assert [r["id"] for r in first] == [f"chat-{i:05d}" for i in range(40)]
    assert {r["category"] for r in first} == {"chat"} and len({r["input"] for r in first}) == 40
    assert set(r["input"] for r in first) <= set(p for p, _ in chat_prompts(heldout_texts()))
