"""Seeded synthetic documents for the benchmarks: varied English-like sentences, one or more
64-token chunks each. Nothing is downloaded."""
from __future__ import annotations

import random

_SUBJECTS = "the engineer|a sailor|the old mayor|my neighbour|the committee|a young botanist|the archive|our team".split("|")
_VERBS = "repaired|described|sold|painted|measured|forgot|discovered|catalogued|rebuilt|questioned".split("|")
_OBJECTS = ("the lighthouse|a copper kettle|the northern bridge|seven maps|the harbour wall|a violin|the orchard|"
            "an iron gate|the clock tower|a sailing boat|the museum roof|twelve letters").split("|")
_PLACES = "in Kell|near the river|before winter|after the storm|in 1854|at dawn|in the valley|by the coast".split("|")


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."


def documents(n: int, *, sentences: tuple[int, int] = (4, 6), seed: int = 0) -> list[dict]:
    """`n` documents of `sentences` sentences (about 9 tokens each) with a unique record number."""
    rng = random.Random(seed)
    return [
        {
            "id": f"doc-{i:06d}",
            "text": " ".join(sentence(rng) for _ in range(rng.randint(*sentences))) + f" Record {i}.",
            "metadata": {"shard": i % 8, "kind": rng.choice(["report", "letter", "note"])},
        }
        for i in range(n)
    ]


def queries(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]
