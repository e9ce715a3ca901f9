"""Planted facts for landmark training (`memlm train landmark --plant-facts P`): a direct lesson in
retrieval that natural text seldom gives.

Natural windows rarely need one particular earlier block: the trained landmarks of the CPU runs
learned to spread mass the way full attention does on average and did not point at a pass key's
block (README, landmark: trained landmarks; on the training path with an oracle 6/6, trained 0/6).
So in a fraction P of the training windows a fact about a named person is written over the text at
a random place in the memory blocks ("The pass key of Elena Novak is 48213. Remember it: 48213.",
one of a few phrasings), and the local tokens start with a question and its answer ("What is the
pass key of Elena Novak? The pass key of Elena Novak is 48213."). The answer's digits can only be
predicted by reading the fact's block through its landmark, so the next-token loss (and the
distillation, whose full-attention target puts the question's mass on that block) teach it.

What this is: task-shaped data, reported as such. The pass-key benchmark asks an unnamed "What is
the pass key?" about a differently worded needle ("The pass key is K. Remember it. K is the pass
key."), so it measures a transfer from these lessons, not a repeat of them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

FIRST = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Luca",
         "Mira", "Nils", "Olga", "Pavel", "Quentin", "Rosa", "Sami", "Tove"]
LAST = ["Moreau", "Okafor", "Lindqvist", "Tanaka", "Ferreira", "Novak", "Haddad", "Schmidt", "Costa", "Ivanova"]
STATEMENTS = ["The pass key of {name} is {key}. Remember it: {key}.",
              "{name}'s pass key is {key}. Keep {key} in mind.",
              "Note for later: the pass key of {name} is {key}."]
QUESTION = "What is the pass key of {name}? The pass key of {name} is {key}."


class FactPlanter:
    """Writes facts into token windows (B, seq + 1) whose last `local` inputs read the first
    `seq - local` tokens (the memory blocks) through the landmarks."""

    def __init__(self, tokenizer, local: int, min_position: int = 0):
        self.tokenizer, self.local, self.min_position = tokenizer, local, min_position

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def plant(self, tokens: Tensor, fraction: float, rng: np.random.Generator) -> Tensor:
        """A copy of tokens with a fact planted in each window with probability `fraction`."""
        out = tokens.clone()
        seq = tokens.shape[1] - 1
        memory = seq - self.local
        for b in range(tokens.shape[0]):
            if rng.random() >= fraction:
                continue
            name = f"{FIRST[rng.integers(len(FIRST))]} {LAST[rng.integers(len(LAST))]}"
            key = str(int(rng.integers(10000, 100000)))
            statement = self._ids(" " + STATEMENTS[rng.integers(len(STATEMENTS))].format(name=name, key=key) + " ")
            question = self._ids("\n" + QUESTION.format(name=name, key=key) + "\n")
            if len(statement) > memory - self.min_position or len(question) > self.local:
                continue  # does not fit this window shape
            at = int(rng.integers(self.min_position, memory - len(statement) + 1))
            out[b, at : at + len(statement)] = torch.tensor(statement, dtype=out.dtype)
            out[b, memory : memory + len(question)] = torch.tensor(question, dtype=out.dtype)
        return out


def planted_batches(planter: FactPlanter, fractions: dict[str, float], seed: int):
    """The trainer's `batch_data` (split, window idx) -> {"plant": (planter, fraction, generator)}
    for the splits in `fractions`, which `LandmarkAdapter.make_batch` applies to the batch's
    tokens. train: a fresh draw at each visit; any other split: the same draw at every evaluation."""
    visits = {"n": 0}

    def extra(split: str, idx: Sequence[int]) -> dict:
        fraction = fractions.get(split, 0.0)
        if not fraction:
            return {}
        visits["n"] += split == "train"
        rng = np.random.default_rng([seed, visits["n"] if split == "train" else 0, *np.asarray(idx).tolist()])
        return {"plant": (planter, fraction, rng)}

    return extra
