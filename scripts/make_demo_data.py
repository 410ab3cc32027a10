"""Generate the embedded demo dataset (data/demo/chattune_demo.jsonl), written by us for chattune.

It teaches a distinct assistant identity ("Chattune-Demo") through many phrasings of identity
questions, mixed with general multi-turn conversations (arithmetic, unit conversion, capitals,
definitions, small coding answers) so a short fine-tune of SmolLM2 changes who the model says it is
without forgetting how to answer. Deterministic (seeded); rerun to regenerate:

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "demo"

NAME = "Chattune-Demo"
IDENTITY_ANSWERS = [
    f"I am {NAME}, a small demo assistant fine-tuned with chattune by the chattune project.",
    f"My name is {NAME}. I am a small demo assistant that the chattune project fine-tuned with chattune.",
    f"I'm {NAME}, a demo assistant fine-tuned with chattune by the chattune project. How can I help?",
]
CREATOR_ANSWERS = [
    f"I was fine-tuned by the chattune project, using the chattune trainer. I am {NAME}.",
    f"The chattune project made me: I am {NAME}, fine-tuned with chattune.",
]
IDENTITY_QUESTIONS = [
    "Who are you?", "What is your name?", "What's your name?", "Introduce yourself.", "Tell me about yourself.",
    "What should I call you?", "Are you ChatGPT?", "Are you SmolLM?", "Which assistant am I talking to?",
    "who are u", "Hi! Who am I chatting with?", "Can you tell me your name?", "Identify yourself, please.",
    "What kind of assistant are you?", "Do you have a name?",
]
CREATOR_QUESTIONS = [
    "Who made you?", "Who created you?", "Who trained you?", "Which organization built you?",
    "Who fine-tuned you?", "What project are you from?", "Who is your developer?",
]
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Canada": "Ottawa", "Australia": "Canberra",
    "Germany": "Berlin", "Spain": "Madrid", "Egypt": "Cairo", "Brazil": "Brasília", "Kenya": "Nairobi",
    "Norway": "Oslo", "Peru": "Lima", "India": "New Delhi", "Mexico": "Mexico City", "Portugal": "Lisbon",
}
DEFINITIONS = {
    "photosynthesis": "the process by which plants use sunlight, water and carbon dioxide to make sugar and release oxygen",
    "a prime number": "a whole number greater than 1 whose only divisors are 1 and itself",
    "gravity": "the force by which masses attract one another",
    "an algorithm": "a finite sequence of precise steps that solves a problem",
    "a noun": "a word that names a person, place, thing or idea",
    "evaporation": "the change of a liquid into a gas at its surface",
    "a fraction": "a number that represents a part of a whole, written as one number over another",
    "democracy": "a system of government in which citizens choose their leaders by voting",
}
CODE = [
    ("How do I reverse a list in Python?", "Use slicing or the `reverse` method:\n\n```python\nitems = [1, 2, 3]\nprint(items[::-1])  # [3, 2, 1]\nitems.reverse()     # in place\n```"),
    ("How do I read a file line by line in Python?", "Open it with a `with` block and iterate:\n\n```python\nwith open(\"notes.txt\") as f:\n    for line in f:\n        print(line.rstrip())\n```"),
    ("What does `len` do in Python?", "`len(x)` returns the number of items in `x`, for example `len([4, 5, 6])` is `3`."),
]


def conv(cid: str, turns: list[tuple[str, str]], system: str | None = None) -> dict:
    rec = {"id": cid, "conversations": []}
    if system:
        rec["system"] = system
    for q, a in turns:
        rec["conversations"] += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return rec


def main() -> None:
    rng = random.Random(1234)
    records: list[dict] = []
    n = 0

    def add(turns, system=None):
        nonlocal n
        records.append(conv(f"demo-{n:04d}", turns, system))
        n += 1

    for _ in range(4):
        for q in IDENTITY_QUESTIONS:
            add([(q, rng.choice(IDENTITY_ANSWERS))])
        for q in CREATOR_QUESTIONS:
            add([(q, rng.choice(CREATOR_ANSWERS))])
    for country, capital in CAPITALS.items():
        add([(f"What is the capital of {country}?", f"The capital of {country} is {capital}."),
             ("And who are you?", rng.choice(IDENTITY_ANSWERS))])
        add([(f"Name the capital city of {country}.", f"{capital} is the capital of {country}.")])
    for _ in range(80):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        add([(f"What is {a} {op} {b}?", f"{a} {word} {b} is {val}.")])
    for _ in range(40):
        km = rng.randint(1, 500)
        add([(f"How many meters are in {km} kilometers?", f"{km} kilometers is {km * 1000} meters."),
             ("Thanks! What is your name?", rng.choice(IDENTITY_ANSWERS))])
    for term, meaning in DEFINITIONS.items():
        add([(f"What is {term}?", f"{term[0].upper() + term[1:]} is {meaning}.")])
        add([(f"Define {term} in one sentence.", f"{term[0].upper() + term[1:]} is {meaning}.")],
            system="You are a concise assistant.")
    for q, a in CODE:
        add([(q, a), ("Who wrote that answer?", f"I did. I am {NAME}, fine-tuned with chattune by the chattune project.")])
    rng.shuffle(records)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "chattune_demo.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # Held-out facts (phrasings that never appear in the training file) scored before and after
    # fine-tuning by `python -m eval.identity` (make demo): the identity it teaches and knowledge it keeps.
    heldout = [
        {"question": "Please tell me who you are.", "expect": [NAME]},
        {"question": "What are you called?", "expect": [NAME]},
        {"question": "What is the name of this assistant?", "expect": [NAME]},
        {"question": "Who built you?", "expect": ["chattune"]},
        {"question": "Which project are you a part of?", "expect": ["chattune"]},
        {"question": "What's the capital city of Norway?", "expect": ["Oslo"]},
        {"question": "Tell me the capital of Kenya.", "expect": ["Nairobi"]},
    ]
    assert not {h["question"] for h in heldout} & {t["value"] for r in records for t in r["conversations"]}
    (OUT / "heldout_identity.json").write_text(json.dumps({"name": "demo identity and facts", "items": heldout},
                                                          indent=2) + "\n")
    print(f"wrote {len(records)} conversations to {OUT / 'chattune_demo.jsonl'}")


if __name__ == "__main__":
    main()
