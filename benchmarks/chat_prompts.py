"""General chat prompts for self-distillation: hand-written request templates filled with hand-written topics.

The shipped training prompts are code and math only, so an adapter trained on them drafts chat answers
poorly (the held-out chat prompts get the fewest tokens per call). These prompts have the shape of the
held-out chat prompts (`mtp_jax/data/prompts/heldout_prompts.jsonl`: explain, tips, short poems, emails,
recipes, comparisons, fun facts, ...) on other topics; a topic named in any held-out prompt is left out,
so the held-out set stays unseen. The answers come from the base model itself
(`python -m mtp_jax.data.distill`), so no other model's text is used.

    python benchmarks/chat_prompts.py --out /tmp/chat_prompts.jsonl
"""

import argparse
import json
import random
import re

from code_prompts import write_prompts

from mtp_jax.data.readers import resolve_data_file

CONCEPTS = ["gravity", "electricity", "magnetism", "evolution", "the immune system", "compound interest",
            "supply and demand", "democracy", "the greenhouse effect", "plate tectonics", "black holes",
            "the internet", "machine learning", "DNA", "the stock market", "a budget", "recycling",
            "erosion", "friction", "the metric system", "time zones", "the scientific method", "renewable energy",
            "nuclear energy", "blockchain", "a credit score", "the placebo effect", "the water table",
            "tides", "seasons", "the food chain", "biodiversity", "cloud computing", "encryption",
            "opportunity cost", "the Pythagorean theorem", "probability", "an ecosystem", "metabolism",
            "sound waves", "static electricity", "the speed of light", "a solar eclipse", "ocean currents",
            "the nervous system", "digestion", "an election", "taxes", "insurance", "a mortgage"]
DEVICES = ["a microwave oven", "a bicycle gear", "a solar panel", "a thermostat", "a compass", "a camera",
           "a touch screen", "a washing machine", "a GPS receiver", "an electric car", "a wind turbine",
           "a smoke detector", "a light bulb", "a battery", "a telescope", "a vacuum cleaner", "a dishwasher",
           "an elevator", "a zipper", "a printer", "a lock and key", "a hot air balloon", "a submarine",
           "a heart pacemaker", "a barcode scanner", "noise-cancelling headphones", "a pressure cooker",
           "a sewing machine", "a parachute", "a traffic light"]
WHY = ["do cats purr", "does bread go stale", "do we yawn", "is the ocean salty", "do onions make people cry",
       "do we dream", "does ice float", "do birds migrate", "is the moon sometimes visible during the day",
       "do stars twinkle", "do we get goosebumps", "does metal feel colder than wood", "do bees make honey",
       "do our ears pop on airplanes", "does popcorn pop", "do we have fingerprints",
       "is exercise good for the brain", "do zebras have stripes", "does the moon change shape",
       "do some people snore", "is sleep important for children", "do apples turn brown after cutting",
       "does a spoon look bent in water", "do dogs wag their tails", "do deserts get cold at night"]
GOALS = ["saving money", "staying focused while studying", "keeping houseplants alive", "running a first 5K",
         "cooking for one", "making new friends in a new city", "preparing for a job interview",
         "giving a presentation", "reducing screen time", "keeping a tidy desk", "starting a vegetable garden",
         "writing a good essay", "reading more books", "staying hydrated", "learning to play the guitar",
         "taking better photos with a phone", "traveling on a budget", "staying calm before an exam",
         "organizing a small closet", "waking up earlier", "managing stress", "learning to swim as an adult",
         "writing a resume", "keeping a journal", "eating more vegetables"]
SUBJECTS = ["the moon", "a rainy afternoon", "an old lighthouse", "a cup of coffee", "autumn leaves",
            "a busy city street", "a mountain lake", "friendship", "a lost kite", "the first day of school",
            "a snowy forest", "a garden in spring", "a train journey", "a sleepy cat", "the desert at night",
            "a thunderstorm", "an empty playground", "the smell of fresh bread", "a river", "a starry sky"]
MESSAGES = ["asking a neighbor to keep the music down", "inviting coworkers to a team lunch",
            "asking a professor for an extension", "declining a meeting invitation",
            "thanking a friend for a birthday gift", "asking a landlord to fix a leaking tap",
            "introducing yourself to a new team", "requesting a day off", "apologizing for a late reply",
            "following up after a job interview", "congratulating a colleague on a promotion",
            "asking a shop about a missing order"]
PEOPLE = ["a doctor", "a bus driver", "a coach", "a neighbor", "a mentor", "a librarian", "a nurse",
          "a grandparent", "a volunteer", "a classmate"]
PLACES = ["Rome", "Tokyo", "Cairo", "New York", "Rio de Janeiro", "London", "Istanbul", "Mexico City",
          "Barcelona", "Bangkok", "Cape Town", "Vienna", "Toronto", "Buenos Aires", "Seoul", "Amsterdam",
          "Mumbai", "Prague", "Lisbon", "Nairobi"]
COUNTRIES = ["Canada", "Japan", "Brazil", "Egypt", "Norway", "India", "Kenya", "Italy", "Peru", "Vietnam",
             "Iceland", "Morocco", "New Zealand", "Argentina", "Greece", "Chile", "Sweden", "Thailand"]
PAIRS = [("a frog", "a toad"), ("a crocodile", "an alligator"), ("a meteor", "a meteorite"),
         ("a hurricane", "a tornado"), ("a democracy", "a monarchy"), ("an ocean", "a sea"),
         ("baking soda", "baking powder"), ("a lake", "a pond"), ("a rabbit", "a hare"),
         ("a comet", "an asteroid"), ("speed", "velocity"), ("a vegetable", "a fruit"),
         ("a simile", "a metaphor"), ("a debit card", "a credit card"), ("mass", "weight"),
         ("an atom", "a molecule"), ("a butterfly", "a moth"), ("a turtle", "a tortoise"),
         ("stocks", "bonds"), ("a latitude", "a longitude")]
DISHES = ["tomato soup", "fried rice", "banana bread", "a vegetable omelette", "guacamole", "lentil curry",
          "oatmeal cookies", "a Greek salad", "garlic bread", "mashed potatoes", "a fruit smoothie",
          "spaghetti with tomato sauce", "hummus", "roasted vegetables", "chicken noodle soup"]
ANIMALS = ["elephants", "penguins", "owls", "dolphins", "giraffes", "honeybees", "camels", "koalas",
           "sea turtles", "wolves", "hummingbirds", "bats", "sloths", "kangaroos", "jellyfish", "ants",
           "polar bears", "flamingos", "chameleons", "whales"]
SITUATIONS = ["buying a used car", "moving to a new city", "choosing a laptop", "starting a small business",
              "renting a first apartment", "picking a university", "planning a wedding", "buying a bicycle",
              "choosing a pet fish", "changing careers", "hosting a dinner party", "planting a tree"]
STORIES = ["Cinderella", "Hamlet", "The Odyssey", "Moby-Dick", "Pride and Prejudice", "Don Quixote",
           "Little Red Riding Hood", "Alice's Adventures in Wonderland", "The Tortoise and the Hare",
           "Snow White", "Macbeth", "Robinson Crusoe", "The Little Prince", "Frankenstein", "Treasure Island"]
TRIPS = ["a beach holiday", "a business trip", "a ski weekend", "a long flight", "a road trip",
         "a hiking day", "a city break in winter", "a music festival"]
EVENTS = ["a graduation party", "a rainy weekend", "a family reunion", "a school fundraiser",
          "a picnic in the park", "a retirement celebration", "a book club meeting", "a game night"]
PLANS = ["weekly meal", "morning routine", "study", "beginner strength training", "monthly budget",
         "daily stretching"]

# (templates, topics); a template's {0}, {1} take a topic (pairs fill both)
FAMILIES = [
    (["Explain {0} in simple terms.", "What is {0}?", "How would you explain {0} to a ten-year-old?",
      "Give me a short overview of {0}."], CONCEPTS),
    (["How does {0} work?", "Explain how {0} works, step by step."], DEVICES),
    (["Why {0}?"], WHY),
    (["Give me three tips for {0}.", "What are some common mistakes when {0}?"], GOALS),
    (["Write a short poem about {0}.", "Write a haiku about {0}.", "Write a four-line rhyme about {0}.",
      "Write a short story about {0} in five sentences."], SUBJECTS),
    (["Write a polite email {0}.", "Write a short text message {0}."], MESSAGES),
    (["Write a short thank-you note to {0}."], PEOPLE),
    (["Describe the city of {0} in a few sentences.", "What are the best things to see in {0}?"], PLACES),
    (["What is {0} known for?", "Tell me three interesting facts about {0}."], COUNTRIES),
    (["What is the difference between {0} and {1}?"], PAIRS),
    (["Give me a simple recipe for {0}.", "What do I need to make {0}?"], DISHES),
    (["Tell me a fun fact about {0}.", "What do {0} eat?", "Where do {0} live?"], ANIMALS),
    (["What should I consider when {0}?"], SITUATIONS),
    (["Summarize the story of {0} in three sentences.", "Who are the main characters of {0}?"], STORIES),
    (["Give me a packing list for {0}."], TRIPS),
    (["Give me three ideas for {0}."], EVENTS),
    (["What does a good {0} plan look like?"], PLANS),
]


def heldout_texts() -> list[str]:
    """Every held-out prompt (code, math and chat), lower-cased."""
    with open(resolve_data_file("builtin:heldout_prompts.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["input"].lower() for line in f if line.strip()]


def named_in(topic: str | tuple[str, ...], texts: list[str]) -> bool:
    """Whether the topic's main word (its last word; of a pair, either's) occurs in one of `texts`,
    with or without a plural s: "a rainbow" is named in "Explain how a rainbow forms." """
    forms = set()
    for part in topic if isinstance(topic, tuple) else (topic,):
        word = part.split()[-1].lower()
        forms |= {word, word + "s", word + "es", re.sub(r"s$", "", word), re.sub(r"es$", "", word)}
    pattern = re.compile(rf"\b({'|'.join(map(re.escape, sorted(forms)))})\b")
    return any(pattern.search(text) for text in texts)


def chat_prompts(heldout: list[str]) -> list[tuple[str, str]]:
    """(prompt, topic) for every template and topic whose topic no held-out prompt names, in a fixed order."""
    out = []
    for templates, topics in FAMILIES:
        for topic in topics:
            if named_in(topic, heldout):
                continue
            args = topic if isinstance(topic, tuple) else (topic,)
            out += [(t.format(*args), " / ".join(args)) for t in templates]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prompts = chat_prompts(heldout_texts())
    random.Random(args.seed).shuffle(prompts)
    n = write_prompts(args.out, "chat", [{"topic": topic, "input": text} for text, topic in prompts[:args.limit]])
    print(f"{args.out}: {n} chat prompts")


if __name__ == "__main__":
    main()
