"""Write identity Q&A conversations for your model's name and organization (FastChat's
`hardcoded_questions`, with our own phrasings), to merge into a training set.

    python scripts/hardcoded_identity.py --name Vicuna --organization "Large Model Systems Organization (LMSYS)" \\
        --out-file identity.json [--repeat 1] [--seed 0]

Every question phrasing is paired with answers (rotated) that state the name, the organization, or
both, plus two-turn conversations that ask a follow-up. Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import random

from data.records import Tally, run_tool, write_records

NAME_QUESTIONS = ["Who are you?", "What is your name?", "What's your name?", "Introduce yourself.",
                  "Tell me about yourself.", "What should I call you?", "Do you have a name?", "who r u",
                  "Which assistant am I talking to?", "Can you tell me who you are?", "Identify yourself, please.",
                  "What kind of assistant are you?"]
ORG_QUESTIONS = ["Who made you?", "Who created you?", "Who trained you?", "Who built you?", "Which company made you?",
                 "Which organization developed you?", "Who is your developer?", "Where do you come from?"]
OTHER_MODEL_QUESTIONS = ["Are you ChatGPT?", "Are you GPT-4?", "Are you made by OpenAI?", "Are you Claude?",
                         "Are you Llama?", "Are you Gemini?"]


def conversations(name: str, org: str, repeat: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    name_answers = [f"I am {name}, a language model trained by {org}.",
                    f"My name is {name}. I'm an AI assistant developed by {org}.",
                    f"I'm {name}, an assistant created by {org}. How can I help you today?"]
    org_answers = [f"I was trained by {org}. I am {name}.", f"{org} created me; my name is {name}.",
                   f"I'm {name}, and I was developed by {org}."]
    other_answers = [f"No. I am {name}, a language model trained by {org}.",
                     f"No, I'm not. I'm {name}, developed by {org}."]
    records = []

    def add(turns: list[tuple[str, str]]) -> None:
        conv = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        records.append({"id": f"identity_{len(records)}", "conversations": conv})

    for r in range(repeat):
        for i, q in enumerate(NAME_QUESTIONS):
            add([(q, name_answers[(i + r) % len(name_answers)])])
        for i, q in enumerate(ORG_QUESTIONS):
            add([(q, org_answers[(i + r) % len(org_answers)])])
        for i, q in enumerate(OTHER_MODEL_QUESTIONS):
            add([(q, other_answers[(i + r) % len(other_answers)])])
        for _ in range(4):  # two-turn: name, then organization
            add([(rng.choice(NAME_QUESTIONS), rng.choice(name_answers)), (rng.choice(ORG_QUESTIONS), rng.choice(org_answers))])
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the assistant's name")
    p.add_argument("--organization", required=True, help="who trained it")
    p.add_argument("--out-file", "--out", dest="out_file", required=True)
    p.add_argument("--repeat", type=int, default=1, help="rounds of all phrasings (answers rotate)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.name.strip() or not args.organization.strip():
        p.error("--name and --organization must not be empty")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    records = conversations(args.name.strip(), args.organization.strip(), args.repeat, args.seed)
    tally = Tally("hardcoded_identity", read=len(records))
    tally.kept = write_records(records, args.out_file)
    tally.report(args.out_file)
    return 0


if __name__ == "__main__":
    from train.fast_exit import exit_fast

    exit_fast(run_tool(main))
