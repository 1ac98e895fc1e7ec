"""Math prompts for self-distillation: hand-written word-problem and exercise templates filled with numbers and
names from a seeded generator, as the shipped math prompts were made, on more problems and more kinds.

The answers come from the base model itself (`python -m mtp_jax.data.distill`), right or wrong: the drafts learn
to predict the base model's text. A prompt equal to a held-out prompt (`mtp_jax/data/prompts/heldout_prompts.jsonl`)
is dropped.

    python benchmarks/math_prompts.py --out /tmp/math_prompts.jsonl --limit 3000
"""

import argparse
import random

from chat_prompts import heldout_texts
from code_prompts import write_prompts

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Ravi", "Sofia", "Theo", "Uma", "Yuki", "Zoe"]
ITEMS = ["notebooks", "apples", "tickets", "pens", "mugs", "plants", "books", "stickers", "candles", "balloons"]
COLORS = ["red", "blue", "green"]


def _problem(r: random.Random) -> str:
    """One problem of a template drawn uniformly."""
    n, name = r.randint, r.choice(NAMES)
    other = r.choice([x for x in NAMES if x != name])
    item = r.choice(ITEMS)
    templates = [
        lambda: f"{name} buys {n(2, 12)} {item} at ${n(2, 25)} each. How much does {name} spend?",
        lambda: f"{name} has ${n(50, 300)}. After buying {n(2, 9)} {item} at ${n(3, 15)} each, how much money is left?",
        lambda: f"What is {n(12, 99)} multiplied by {n(12, 99)}? Show your steps.",
        lambda: f"What is {n(100, 999)} divided by {n(3, 19)}? Give the quotient and the remainder.",
        lambda: f"What is {r.choice([5, 10, 12, 15, 20, 25, 30, 40, 75])}% of {n(20, 500)}?",
        lambda: f"Solve for x: {n(2, 9)}x + {n(1, 30)} = {n(31, 120)}.",
        lambda: f"A triangle has a base of {n(3, 30)} cm and a height of {n(3, 30)} cm. What is its area?",
        lambda: f"Convert {n(70, 500)} minutes to hours and minutes.",
        lambda: f"What is the average of {', '.join(str(n(1, 100)) for _ in range(n(4, 6)))}?",
        lambda: (f"A jar has {n(1, 9)} red, {n(1, 9)} blue and {n(1, 9)} green beads. What is the probability of "
                 f"picking a {r.choice(COLORS)} bead?"),
        lambda: (f"{name} is {n(6, 40)} years old. {other} is {n(2, 30)} years older. How old will {other} be in "
                 f"{n(2, 15)} years?"),
        lambda: f"Round {n(1000, 99999) / 100:.2f} to the nearest {r.choice(['whole number', 'tenth', 'ten'])}.",
        lambda: f"Use the difference of squares to compute {n(21, 99)}^2 - {n(1, 20)}^2.",
        lambda: f"A square has a perimeter of {4 * n(2, 40)} cm. What is its area?",
        lambda: f"Write {n(1, 9)}/{r.choice([2, 4, 5, 8, 10, 20, 25])} as a decimal and as a percentage.",
        lambda: (lambda a, d: f"What is the next number in the sequence {a}, {a + d}, {a + 2 * d}, {a + 3 * d}?")(
            n(1, 50), n(2, 15)),
        lambda: (f"A recipe for {n(2, 6)} people uses {10 * n(10, 60)} grams of rice. How much rice is needed for "
                 f"{n(7, 20)} people?"),
        lambda: (f"{name} walks {n(2, 8)} km in {5 * n(4, 20)} minutes. How long does it take to walk {n(9, 30)} km "
                 f"at the same pace?"),
        lambda: f"Is {n(50, 500)} a prime number? Explain.",
        lambda: f"What is {n(100, 999)} + {n(100, 999)} - {n(10, 500)}? Show your work.",
        lambda: f"A cylinder has a radius of {n(2, 12)} cm and a height of {n(3, 25)} cm. What is its volume?",
        lambda: f"Expand ({n(2, 7)}x + {n(1, 9)})({n(2, 7)}x - {n(1, 9)}).",
        lambda: f"Find x if x/{n(2, 12)} = {n(1, 20)}/{n(2, 12)}.",
        lambda: (f"A phone plan costs ${n(10, 40)} per month plus ${n(2, 9)} per GB. How much is a month with "
                 f"{n(1, 20)} GB?"),
        lambda: f"How many minutes are there in {n(2, 9)} days?",
        lambda: f"A rectangle has an area of {n(2, 12) * n(2, 12) * 6} square meters and a width of 6 meters. How long is it?",
    ]
    return r.choice(templates)()


def math_prompts(count: int, seed: int, heldout: list[str]) -> list[str]:
    """`count` distinct problems (fewer if the templates run out of new ones), none equal to a held-out prompt."""
    r, held, out, seen = random.Random(seed), set(heldout), [], set()
    for _ in range(count * 20):
        if len(out) == count:
            break
        text = _problem(r)
        if text not in seen and text.lower() not in held:
            seen.add(text)
            out.append(text)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = write_prompts(args.out, "math", [{"input": text} for text in math_prompts(args.limit, args.seed, heldout_texts())])
    print(f"{args.out}: {n} math prompts")


if __name__ == "__main__":
    main()
