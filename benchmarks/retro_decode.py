"""RETRO's cost inside the model, without a store: generation tokens/s of `none` against `retro`
with the shipped adapter, each chunk's neighbours taken from real text instead of a search.

    .venv/bin/python benchmarks/retro_decode.py [--weights memlm/train/trained/retro-smollm2-cpu]
        [--prompt-tokens 256] [--new-tokens 128] [--runs 3] [--threads 2] [--model-weights q4_1]

`benchmarks/retro.py --parts speed` measures the whole served path (the corpus store's search
included) but needs the training corpus's store (tens of minutes to build on 2 cores). This one
needs nothing but the bundled model: the prompt is Python standard-library source, and every
chunk's k neighbours are 128-token windows of other standard-library files (what a code collection
would return), so the columns differ only in what RETRO computes per token and per chunk:
- none: the plain model (the fused C decode layer);
- retro, CCA module path: the decode step's cross-attention in PyTorch ops (`--no-c-step` alone);
- retro: the served path (the C cross-attention step where the model is q4_1), neighbour states
  cold (the state cache emptied before each run) and warm (every neighbour's base states kept).
Per chunk: the time encoding neighbours (their base pass and the encoder).
"""
from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _retro_common import generation_arguments, load_served_model, print_rates, run_summary, stdlib_modules  # noqa: E402


class TextNeighbours:
    """GenerationHooks for a RETRO adapter whose neighbours come from texts, not a store: chunk u
    reads k windows of neighbour_length tokens at random offsets of the texts (seeded per chunk,
    so every run reads the same ones)."""

    def __init__(self, adapter, model, texts: list[list[int]], cache, seed: int):
        self.adapter, self.model, self.texts, self.cache, self.seed = adapter, model, texts, cache, seed
        self.chunk_tokens = adapter.config.chunk_tokens
        self.state = None
        self.chunks_read = 0
        self.memory_s = 0.0
        self.citations = ()

    def chunk_phase(self, prompt_ids) -> int:
        phase = (-len(prompt_ids)) % self.chunk_tokens
        self.state = self.adapter.new_state(self.model, phase, self.cache)
        self.adapter.slot.state = self.state
        return phase

    def prefix_embeds(self, input_ids):
        return None

    def on_token(self, token_id: int, position: int) -> None:
        pass

    def on_chunk(self, token_ids, end: int) -> None:
        config, state = self.adapter.config, self.state
        r, k = config.neighbour_length, config.neighbours
        for u in range(len(state.neighbours), (end + state.phase) // self.chunk_tokens):
            rng = random.Random(self.seed * 100_003 + u)
            ids = torch.zeros(1, k, r, dtype=torch.long)
            for j in range(k):
                text = self.texts[rng.randrange(len(self.texts))]
                start = rng.randrange(max(1, len(text) - r))
                ids[0, j] = torch.tensor(text[start : start + r])
            state.set_neighbours(u, ids, torch.ones(1, k, r, dtype=torch.bool))
            self.chunks_read += 1


def main() -> None:
    p = generation_arguments(__doc__)
    p.add_argument("--weights", default=None, help="RETRO adapter folder (default: the shipped one)")
    args = p.parse_args()

    from memlm.engine import SamplingParams
    from memlm.generation import generate_tokens
    from memlm.modes.retro import model as retro_model
    from memlm.modes.retro.mode import SHIPPED_WEIGHTS
    from memlm.modes.retro.state_cache import NeighbourStateCache
    from memlm.train.weights import folder_fingerprint, load_adapter

    folder, tokenizer, model = load_served_model(args)
    adapter = load_adapter(args.weights or SHIPPED_WEIGHTS, model, folder_fingerprint(folder), attach=False)
    adapter.eval().requires_grad_(False)
    texts = [tokenizer.encode(text) for _, text in stdlib_modules(40, args.seed)]
    prompt = texts[0][: args.prompt_tokens]
    sampling = SamplingParams(max_new_tokens=args.new_tokens)
    cache = NeighbourStateCache(256 << 20)
    columns = ("none", "retro, CCA module path, warm", "retro cold", "retro warm")
    rates = {c: [] for c in columns}
    encode_ms, outputs = [], {}

    def run(name: str) -> float:
        c_step = retro_model.C_CROSS_ATTENTION
        hooks = None
        if name != "none":
            retro_model.C_CROSS_ATTENTION = "module path" not in name
            if name == "retro cold":
                cache.clear()
            hooks = TextNeighbours(adapter, model, texts[1:], cache, args.seed)
            adapter.attach(model)
        try:
            t0 = time.perf_counter()
            kw = {} if hooks is None else {"hooks": hooks}
            *_, out = generate_tokens(model, tokenizer, prompt, sampling, threading.Event(), eos_ids=(), **kw)
            dt = time.perf_counter() - t0
        finally:
            retro_model.C_CROSS_ATTENTION = c_step
            if hooks is not None:
                adapter.slot.state = None
                adapter.detach(model)
        outputs.setdefault(name, out.token_ids)
        encode = None if hooks is None else 1000 * hooks.state.encode_s / max(1, hooks.chunks_read)
        return len(out.token_ids) / dt, encode

    with torch.inference_mode():
        for i in range(args.runs + 1):  # the first round warms up
            for name in columns:
                rate, encode = run(name)
                if i:
                    rates[name].append(rate)
                    if name == "retro cold":
                        encode_ms.append(encode)
    print_rates(f"{run_summary(args)}, medians of {args.runs} (CCA at layers {list(adapter.config.layers)}, "
                f"k {adapter.config.neighbours}):", rates)
    a, b = outputs["retro warm"], outputs["retro, CCA module path, warm"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"encode per chunk, cold: {statistics.median(encode_ms):.1f} ms; the C step's greedy tokens equal the "
          f"module path's for the first {same} of {len(a)} (they differ at fp32 rounding, ~4e-6 of the output)")


if __name__ == "__main__":
    main()
