"""landmark's decode cost against knn as the memory grows: decode tokens/s and memory rows read
per query head and layer per step, on the pass-key harness's memories (benchmarks/corpus.py:
documents of ~1,000 tokens, the KV memory built once into the bench cache and cloned per size).

Per memory size N: none (the question alone), knn ungated (every row searched per step through
FAISS fp16, top-8 rows per head), landmark (the service's default: every row scored, the 4 best
blocks' 256 rows read per head) and landmark:minmax (Quest's bound: one representation per block
scored, flat in rows searched); --new-tokens greedy after the question, load excluded, medians of
--runs. Rows searched per step per head (rows whose score a step computes) and read (attended to).

    .venv/bin/python benchmarks/landmark_decode.py [--lengths 4096 16384 65536] [--haystack filler]
        [--new-tokens 32] [--runs 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CorpusMemory, default_cache_root  # noqa: E402
from passkey import LANDMARK_CONFIGS, QUESTION, greedy, trained_landmarks  # noqa: E402

from memlm.modes.knn.reading import PRESETS, knn_mode, prepare_layer_memories  # noqa: E402
from memlm.modes.landmark.blocks import load_block_memories  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--haystack", default="filler")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=str(default_cache_root()))
    p.add_argument("--landmark", nargs="+", default=["landmark", "landmark:minmax"], choices=sorted(LANDMARK_CONFIGS))
    p.add_argument("--landmark-weights", default=None, help="trained landmarks for landmark:trained* (default: shipped)")
    args = p.parse_args()
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(None)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    landmarks = trained_landmarks(model, model_dir, args.landmark, args.landmark_weights)
    q_ids = tok(QUESTION, add_special_tokens=False).input_ids
    corpus = CorpusMemory(Path(args.cache_dir), args.haystack, model, tok, model_dir)
    most = max(corpus.documents_for_tokens(n) for n in args.lengths)
    corpus.ensure_kv(most)
    scratch = Path(args.cache_dir) / "trials"
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"{args.haystack} memories, question + {args.new_tokens} tokens greedy, medians of {args.runs}, "
          f"threads {torch.get_num_threads()}")
    print("| memory tokens | method | tok/s (question prefill included) | vs knn ungated | rows searched / read per head, layer, step |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.lengths:
        m = corpus.documents_for_tokens(n)
        td = Path(tempfile.mkdtemp(dir=scratch))
        try:
            mem = corpus.trial_memory(td / "kv", m)
            rows = len(mem)
            ungated = PRESETS["ungated"]
            reads = {"none": (None, None, "-"),
                     "knn:ungated": (ungated, prepare_layer_memories(model, mem, ungated), f"{rows:,} / {ungated.top_k}")}
            for name in args.landmark:
                cfg = LANDMARK_CONFIGS[name]
                mems, block_ids, _ = load_block_memories(model, mem, layers="all_but_first", landmarks=landmarks, **cfg)
                searched = rows if cfg["representation"] == "max" else len(block_ids)
                reads[name] = (mems.config, mems, f"{searched:,} / {cfg['top_k'] * 64}")
            rates = {name: [] for name in reads}
            for _ in range(args.runs):
                for name, (config, mems, _) in reads.items():
                    t0 = time.perf_counter()
                    if mems is None:
                        greedy(model, q_ids, args.new_tokens)
                    else:
                        with knn_mode(model, mem, config, layer_memories=mems):
                            greedy(model, q_ids, args.new_tokens)
                    rates[name].append(args.new_tokens / (time.perf_counter() - t0))
            base = statistics.median(rates["knn:ungated"])
            for name, (_c, _m, what) in reads.items():
                rate = statistics.median(rates[name])
                print(f"| {rows:,} | {name} | {rate:.2f} | {rate / base:.2f}x | {what} |", flush=True)
        finally:
            shutil.rmtree(td, ignore_errors=True)


if __name__ == "__main__":
    main()
