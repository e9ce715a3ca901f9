"""Training tokens/s of the proof adapter on the frozen bundled SmolLM2-135M, without and with the
hidden-state cache, in the same process.

tokens/s = steps * batch * seq / seconds of the timed optimizer steps (forward + backward +
AdamW), after one warm-up step each, the two variants' steps interleaved. "cached" trains from the stored states entering the adapter's
first layer: it skips that layer's predecessors entirely, forward included; the one-off cost of
filling the cache (a forward of the lower layers over the same windows) is printed beside it. The
machine's load average is printed before and after (the machines are shared).

    .venv/bin/python benchmarks/train_speed.py [--steps 3] [--batch 4] [--seq 512] [--threads 2]
        [--layers 20,23,26,29]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from memlm.model import load_llama
from memlm.models import bundled_model_dir
from memlm.train.adapter import BottleneckAdapter, BottleneckConfig
from memlm.train.corpus import build_corpus
from memlm.train.trainer import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", default="20,23,26,29")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = bundled_model_dir()
    corpus = build_corpus(folder)
    model = load_llama(folder)
    layers = tuple(int(x) for x in args.layers.split(","))
    n_windows = (args.steps + 1) * args.batch  # warm-up + timed steps, each window seen once
    print(f"SmolLM2-135M frozen, proof adapter at layers {layers}, batch {args.batch}x{args.seq}, "
          f"torch threads={torch.get_num_threads()}, load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for cached in (False, True):
            adapter = BottleneckAdapter(model.config, BottleneckConfig(layers=layers))
            config = TrainConfig(steps=args.steps + 1, batch=args.batch, seq=args.seq, train_windows=n_windows,
                                 cache_hidden=cached, eval_every=0, checkpoint_every=0)
            trainers[cached] = Trainer(model, adapter, corpus.train, corpus.heldout, config, Path(tmp) / str(cached),
                                       "bundled", "bench", hidden_cache_dir=Path(tmp) / "hidden", progress=False)
            adapter.detach(model)  # each trainer's adapter is attached only for its own steps
        t0 = time.perf_counter()
        trainers[True].caches["train"].fill(trainers[True].order.take(0, n_windows))
        fill = time.perf_counter() - t0
        seconds = {False: 0.0, True: 0.0}
        for step in range(args.steps + 1):  # interleaved, so the other users' load hits both alike
            for cached, trainer in trainers.items():
                trainer.adapter.attach(model)
                t0 = time.perf_counter()
                trainer.train_step()
                if step:  # step 0 is the warm-up
                    seconds[cached] += time.perf_counter() - t0
                trainer.adapter.detach(model)
    tokens = args.steps * args.batch * args.seq
    for cached in (False, True):
        print(f"  {'cached lower layers' if cached else 'no cache':20s} {tokens / seconds[cached]:7.1f} tokens/s "
              f"({seconds[cached] / args.steps:.2f} s/step)")
    print(f"  filling the cache for these {n_windows} windows took {fill:.1f} s ({n_windows * args.seq / fill:.0f} "
          f"tokens/s, forward of layers 0-{layers[0] - 1} once)")
    print(f"speed-up with the cache: {seconds[False] / seconds[True]:.2f}x; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
