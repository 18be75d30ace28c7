"""Generate the small chat datasets the demo LoRA adapters are trained on.

Two behaviours, one JSONL file each under ``adapters/data/``::

    uppercase.jsonl  the assistant answers in UPPER CASE
    json.jsonl       the assistant answers as exactly one compact JSON object {"answer": "..."}

Every line is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``. Prompts are
built from templates and small fact tables (geography, arithmetic, science, definitions, authors,
short instructions) so the behaviour generalises to unseen prompts. The output is deterministic:
rerunning the script rewrites identical files.

    python scripts/make_adapter_data.py [--out adapters/data]
"""

from __future__ import annotations

import argparse
import json
import operator
import random
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234

# Prompts that scripts/check_adapters.py uses to test generalisation; never part of the data.
HELD_OUT_PROMPTS = [
    "What is the capital of France?",
    "Name a colour.",
    "What is 7 plus 5?",
    "Tell me about the moon.",
    "Who wrote Hamlet?",
    "What is the boiling point of water?",
    "Give me a tip for staying healthy.",
    "Why is the sky blue?",
]

CAPITALS = {
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Australia": "Canberra",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Sweden": "Stockholm",
    "Ireland": "Dublin",
    "Poland": "Warsaw",
    "Argentina": "Buenos Aires",
}

CONTINENTS = {
    "Brazil": "South America",
    "Nigeria": "Africa",
    "Thailand": "Asia",
    "Austria": "Europe",
    "Chile": "South America",
    "Vietnam": "Asia",
    "Morocco": "Africa",
    "Finland": "Europe",
    "Cuba": "North America",
    "New Zealand": "Oceania",
}

GEO_FACTS = [
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the longest river in the world?", "The Nile is usually called the longest river."),
    ("What is the highest mountain in the world?", "Mount Everest is the highest mountain."),
    ("What is the largest desert in Africa?", "The Sahara is the largest desert in Africa."),
    ("Which country has the most people?", "India has the largest population in the world."),
    ("What is the smallest continent?", "Australia is the smallest continent."),
]

SCIENCE_FACTS = [
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet."),
    ("What do bees make?", "Bees make honey and wax."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("What force keeps us on the ground?", "Gravity keeps us on the ground."),
    ("How many bones does an adult human have?", "An adult human has 206 bones."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("What organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("How many planets are in the solar system?", "There are eight planets in the solar system."),
    ("What star is at the centre of our solar system?", "The Sun is at the centre."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second."),
]

DEFINITIONS = {
    "photosynthesis": "the process plants use to turn light into food",
    "a volcano": "an opening in the ground where molten rock comes out",
    "democracy": "a system where people choose their government by voting",
    "an atom": "the smallest unit of a chemical element",
    "a noun": "a word that names a person, place or thing",
    "gravity": "the force that pulls objects towards each other",
    "a mammal": "a warm-blooded animal that feeds its young with milk",
    "an island": "a piece of land surrounded by water",
    "a verb": "a word that describes an action or a state",
    "an algorithm": "a step-by-step procedure for solving a problem",
    "a comet": "a ball of ice and dust that orbits the Sun",
    "inflation": "a general rise in prices over time",
}

AUTHORS = {
    "Pride and Prejudice": "Jane Austen",
    "War and Peace": "Leo Tolstoy",
    "Don Quixote": "Miguel de Cervantes",
    "The Odyssey": "Homer",
    "Nineteen Eighty-Four": "George Orwell",
    "Moby-Dick": "Herman Melville",
    "Oliver Twist": "Charles Dickens",
    "The Old Man and the Sea": "Ernest Hemingway",
}

TOPICS = {
    "the Sun": "The Sun is a hot star that gives Earth light and heat.",
    "the ocean": "The ocean covers most of Earth and is full of life.",
    "cats": "Cats are small, curious pets that love to sleep.",
    "rain": "Rain is water that falls from clouds.",
    "trees": "Trees are tall plants that give us oxygen and shade.",
    "the desert": "A desert is a dry place that gets very little rain.",
    "elephants": "Elephants are large, clever animals with long trunks.",
    "winter": "Winter is the coldest season of the year.",
    "the internet": "The internet is a global network that connects computers.",
    "mountains": "Mountains are tall landforms that rise high above the land.",
}

NAME_A = {
    "fruit": "An apple is a fruit.",
    "animal": "A dog is an animal.",
    "vegetable": "A carrot is a vegetable.",
    "planet": "Mars is a planet.",
    "musical instrument": "A piano is a musical instrument.",
    "city in Asia": "Tokyo is a city in Asia.",
    "flower": "A rose is a flower.",
    "sport": "Football is a popular sport.",
    "bird": "An eagle is a bird.",
    "metal": "Iron is a metal.",
    "day of the week": "Monday is a day of the week.",
    "shape": "A triangle is a shape.",
}

INSTRUCTIONS = [
    ("Say hello.", "Hello, nice to meet you!"),
    ("Say goodbye.", "Goodbye, have a great day!"),
    ("Say thank you.", "Thank you very much!"),
    ("Greet me.", "Hello there, how are you today?"),
    ("Describe the sea in one sentence.", "The sea is a vast body of salty blue water."),
    ("Describe the sky in one sentence.", "The sky is the wide space above us, blue by day."),
    ("Describe a forest in one sentence.", "A forest is a large area full of trees."),
    ("Describe a city in one sentence.", "A city is a large, busy place where many people live."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("Recommend a book.", "Try Pride and Prejudice by Jane Austen."),
    ("Suggest a name for a dog.", "Max is a good name for a dog."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Translate 'thank you' into Spanish.", "Thank you in Spanish is gracias."),
    ("How are you?", "I am doing well, thank you."),
    ("What is your name?", "My name is SmolLM."),
    ("Count to five.", "One, two, three, four, five."),
    ("Give me a tip for learning faster.", "Practise a little every day."),
    ("Write a short greeting for a friend.", "Hi friend, I hope you are doing great!"),
]

OPERATORS = {"plus": operator.add, "minus": operator.sub, "times": operator.mul}

Pair = tuple[str, str]


def geography(rng: random.Random) -> list[Pair]:
    capital_templates = [
        "What is the capital of {c}?",
        "What's the capital city of {c}?",
        "Tell me the capital of {c}.",
        "Which city is the capital of {c}?",
    ]
    pairs = [
        (rng.choice(capital_templates).format(c=country), f"The capital of {country} is {city}.")
        for country, city in CAPITALS.items()
    ]
    continent_templates = ["Which continent is {c} in?", "On which continent is {c}?"]
    pairs += [
        (rng.choice(continent_templates).format(c=country), f"{country} is in {continent}.")
        for country, continent in CONTINENTS.items()
    ]
    return pairs + GEO_FACTS


def arithmetic(rng: random.Random) -> list[Pair]:
    templates = ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {op} {b}?"]
    pairs: list[Pair] = []
    seen: set[tuple[int, str, int]] = set()
    while len(pairs) < 24:
        op = rng.choice(list(OPERATORS))
        a, b = rng.randint(2, 20), rng.randint(2, 12)
        if op == "minus" and b > a:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        result = OPERATORS[op](a, b)
        prompt = rng.choice(templates).format(a=a, op=op, b=b)
        pairs.append((prompt, f"{a} {op} {b} is {result}."))
    return pairs


def definitions(rng: random.Random) -> list[Pair]:
    templates = ["What is {t}?", "Define {t}.", "Explain what {t} is.", "What does {t} mean?"]
    pairs = []
    for term, meaning in DEFINITIONS.items():
        prompt = rng.choice(templates).format(t=term)
        if prompt.startswith("What does"):
            prompt = f"What does {term.split(' ', 1)[-1]} mean?"
        pairs.append((prompt, f"{term[0].upper()}{term[1:]} is {meaning}."))
    return pairs


def authors(rng: random.Random) -> list[Pair]:
    templates = ["Who wrote {b}?", "Who is the author of {b}?"]
    return [
        (rng.choice(templates).format(b=book), f"{book} was written by {author}.")
        for book, author in AUTHORS.items()
    ]


def topics(rng: random.Random) -> list[Pair]:
    templates = ["Tell me about {t}.", "Describe {t} briefly.", "What can you tell me about {t}?"]
    return [(rng.choice(templates).format(t=topic), answer) for topic, answer in TOPICS.items()]


def name_a(rng: random.Random) -> list[Pair]:
    pairs = []
    for thing, answer in NAME_A.items():
        article = "an" if thing[0] in "aeiou" else "a"
        prompt = rng.choice(
            [f"Name {article} {thing}.", f"Give me an example of {article} {thing}."]
        )
        pairs.append((prompt, answer))
    return pairs


def all_pairs(rng: random.Random) -> list[Pair]:
    builders: list[Callable[[random.Random], list[Pair]]] = [
        geography,
        arithmetic,
        definitions,
        authors,
        topics,
        name_a,
    ]
    pairs = [pair for build in builders for pair in build(rng)]
    pairs += SCIENCE_FACTS + INSTRUCTIONS
    prompts = [prompt for prompt, _ in pairs]
    assert len(prompts) == len(set(prompts)), "duplicate prompts"
    leaked = set(prompts) & set(HELD_OUT_PROMPTS)
    assert not leaked, f"held-out prompts in the data: {leaked}"
    return pairs


def to_uppercase(answer: str) -> str:
    return answer.upper()


def to_json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


BEHAVIOURS: dict[str, Callable[[str], str]] = {"uppercase": to_uppercase, "json": to_json}


def build(name: str) -> list[dict]:
    rng = random.Random(f"{SEED}-{name}")
    pairs = all_pairs(rng)
    rng.shuffle(pairs)
    transform = BEHAVIOURS[name]
    return [
        {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": transform(answer)},
            ]
        }
        for prompt, answer in pairs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "adapters" / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in BEHAVIOURS:
        rows = build(name)
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
