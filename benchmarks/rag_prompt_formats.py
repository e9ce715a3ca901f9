"""Which RAG prompt format does the bundled model answer in-context questions best with?

A seeded synthetic QA set: each item is one invented fact ("The capital of Zorbia is Quillon.")
and three distractor passages of the same kind about other invented entities, shuffled so the
answer is not always passage [1]. Every format in `memlm.prompts.RAG_FORMATS` is run with greedy
decoding (12 new tokens); accuracy = the answer appears in the first non-empty line of the
output (the model often starts with a newline, and a later line may just recite another passage).

    .venv/bin/python benchmarks/rag_prompt_formats.py [--items 40] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import threading
import time

import torch

from memlm.engine import SamplingParams
from memlm.generation import GenerationOutcome, generate_tokens
from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir
from memlm.prompts import RAG_FORMATS, build_prompt

SYLLABLES = ["zor", "bi", "quil", "lon", "ten", "zel", "mar", "vo", "kesh", "dra", "lun", "pek", "ori", "sta", "vel", "nix"]
COLOURS = ["teal", "crimson", "amber", "violet", "olive", "indigo", "coral", "silver"]
ANIMALS = ["otter", "heron", "lynx", "badger", "falcon", "tortoise", "ferret", "ibis"]


def invented(rng: random.Random, parts: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


# (fact template, question template, answer maker); {e} is the entity, {a} the answer.
KINDS = [
    ("The capital of {e} is {a}.", "What is the capital of {e}?", lambda r: invented(r)),
    ("Dr. {e}'s favourite colour is {a}.", "What is Dr. {e}'s favourite colour?", lambda r: r.choice(COLOURS)),
    ("The {e} Bridge was completed in {a}.", "In what year was the {e} Bridge completed?", lambda r: str(r.randint(1700, 1999))),
    ("The pass code for the {e} vault is {a}.", "What is the pass code for the {e} vault?", lambda r: str(r.randint(10000, 99999))),
    ("{e}'s pet is a {a}.", "What kind of animal is {e}'s pet?", lambda r: r.choice(ANIMALS)),
]


def make_items(n: int, seed: int, distractors: int = 3) -> list[tuple[list[str], str, str]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        fact, question, answer = KINDS[i % len(KINDS)]
        facts, entities, answers = [], set(), set()
        while len(facts) < distractors + 1:  # distinct entities and answers: no free credit
            e, a = invented(rng, 2), answer(rng)
            if e in entities or a in answers:
                continue
            entities.add(e), answers.add(a)
            facts.append((fact.format(e=e, a=a), question.format(e=e), a))
        passage, q, a = facts[0]
        passages = [f[0] for f in facts]
        rng.shuffle(passages)
        items.append((passages, q, a))
    return items


class _Hit:  # what build_prompt reads from a SearchHit
    def __init__(self, text: str):
        self.text = text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", nargs="*", default=list(RAG_FORMATS))
    args = parser.parse_args()

    model_dir = resolve_model_dir(None)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)  # as the host loads it
    items = make_items(args.items, args.seed)
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
    print(f"{len(items)} items, 3 distractors each, greedy, 12 new tokens, torch threads={torch.get_num_threads()}")
    for fmt in args.formats:
        correct, t0, prompt_tokens = 0, time.perf_counter(), 0
        for passages, question, answer in items:
            built = build_prompt(tokenizer, 8000, prompt=question, hits=[_Hit(p) for p in passages], rag=True, rag_format=fmt)
            prompt_tokens += len(built.input_ids)
            *_, outcome = generate_tokens(model, tokenizer, list(built.input_ids), sampling, threading.Event())
            assert isinstance(outcome, GenerationOutcome)
            first_line = next((line for line in outcome.text.splitlines() if line.strip()), "")
            correct += answer.lower() in first_line.lower()
        elapsed = time.perf_counter() - t0
        print(
            f"{fmt:>11}: accuracy {correct}/{len(items)} = {correct / len(items):.0%}  "
            f"{elapsed:.1f} s ({elapsed / len(items) * 1000:.0f} ms/item, {prompt_tokens / len(items):.0f} prompt tokens/item)"
        )


if __name__ == "__main__":
    main()
