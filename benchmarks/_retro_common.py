"""What benchmarks/retro_decode.py and benchmarks/retro_store.py share (not a benchmark itself): their
text, whole Python standard-library modules; their common arguments (prompt and generation size,
runs, threads, the served model's weights, seed); loading the served model; their results table.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sysconfig
from pathlib import Path
from typing import Optional

import torch


def stdlib_modules(count: int, seed: int) -> list[tuple[str, str]]:
    """(name, source text) of `count` standard-library modules: the top-level .py files over 8,000
    bytes, sorted by name, then shuffled by seed (the same ones on every run of one Python)."""
    paths = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 8000)
    random.Random(seed).shuffle(paths)
    return [(p.stem, p.read_text(errors="replace")) for p in paths[:count]]


def generation_arguments(doc: str) -> argparse.ArgumentParser:
    """A parser with the arguments both benchmarks take; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="measured rounds, after one that warms up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-weights", default="q4_1", help="the served model's weight format")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_served_model(args: argparse.Namespace):
    """torch's threads set to --threads, then (model folder, tokenizer, model in --model-weights) of
    the bundled model."""
    torch.set_num_threads(args.threads)
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir

    folder = resolve_model_dir(None)
    return folder, load_tokenizer(folder), load_model(folder, weights=args.model_weights)


def run_summary(args: argparse.Namespace) -> str:
    """The start of the line above a results table: what was generated, in what, on how many threads."""
    return (f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens greedy, weights {args.model_weights}, "
            f"threads {torch.get_num_threads()}")


def print_rates(title: str, rates: dict[str, list[float]], extra: Optional[dict[str, dict[str, str]]] = None) -> None:
    """title, then a markdown table: each method's median tok/s over its runs and its ratio to the
    median of "none" (run in the same process); extra: {column: {method: cell}} (blank where a
    method has none)."""
    extra = extra or {}
    base = statistics.median(rates["none"])
    print(title)
    print("| " + " | ".join(["method", "tok/s", "vs none", *extra]) + " |")
    print("| " + " | ".join(["---"] * (3 + len(extra))) + " |")
    for name, runs in rates.items():
        rate = statistics.median(runs)
        print("| " + " | ".join([name, f"{rate:.2f}", f"{rate / base:.2f}x", *(col.get(name, "") for col in extra.values())]) + " |")
