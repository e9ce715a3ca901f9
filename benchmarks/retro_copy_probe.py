"""Can RETRO's CCA learn to copy at all? A short probe before any long run.

    .venv/bin/python benchmarks/retro_copy_probe.py --layers 26,29 --lr 3e-3 --steps 60 [--gate-lr-scale 1]

Trains a fresh RETRO adapter on held-out windows of the `memlm train retro` corpus (--max-docs 400)
whose neighbours come from the *leakage* table (the window's own chunks allowed: the top neighbour
of chunk u is u itself and its continuation, i.e. exactly the text that follows), and every 10
steps prints the loss on other held-out windows with those neighbours and with random token ids
as neighbours. An adapter that copies gets "leak" far below "random" within tens of steps; equal
columns mean the neighbours are ignored. The store and tables are memlm's cache, retro/ (as
`memlm train retro` built them). Session 10's figures (the first design, a from-scratch encoder and CCA at 26, 29): no copying
learned in 60 steps (gate lr x30: a 0.05-nat gap while overfitting). Session 11 (the CCA is the
layer's own attention over the base's neighbour states), default layers:
`--steps 0 --gate-init 0.5` (untrained) -> own text 1.985, random 2.725, leak-free 2.704 (base
2.675); layers 8,11,14,17,18,20,23,26,29, `--steps 40 --lr 1e-3 --gate-lr-scale 30` -> own text
0.566 by step 20 (random 3.719: trained on exact copies only, it trusts any neighbour).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from memlm.models.loading import default_cache_dir, load_model, load_tokenizer, resolve_model_dir
from memlm.modes.retro.adapter import RetroAdapter
from memlm.modes.retro.model import RetroConfig
from memlm.modes.retro.settings import DEFAULT_LAYERS
from memlm.modes.retro.training import prepare
from memlm.train.adapter import lower_hidden
from memlm.train.corpus import build_corpus
from memlm.train.data import TokenWindows, corpus_key

CHUNK, SEQ = 64, 512


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)))
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gate-lr-scale", type=float, default=1.0)
    p.add_argument("--gate-init", type=float, default=0.0, help="every gate starts at this tanh value (with --steps 0: "
                   "the untrained CCA at these layers)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--windows", type=int, default=20, help="held-out windows (every 5th is a test window)")
    p.add_argument("--max-docs", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = resolve_model_dir(None)
    tokenizer = load_tokenizer(folder)
    corpus = build_corpus(folder, ("stdlib", "man", "doc"), args.max_docs, log=lambda m: None)
    model = load_model(folder, weights="dense").float().eval().requires_grad_(False)
    config = RetroConfig(layers=tuple(int(x) for x in args.layers.split(",")))
    adapter = RetroAdapter(model.config, config, seed=0)
    with torch.no_grad():
        for cca in adapter.cca.values():
            cca.gate.fill_(float(np.arctanh(args.gate_init)))
    windows = TokenWindows(corpus.heldout.tokens, SEQ)
    idx = np.unique(np.linspace(0, len(windows) - 1, args.windows).round().astype(np.int64))
    tables = prepare(corpus, config, tokenizer, default_cache_dir() / "retro", SEQ, np.zeros(0, np.int64), idx,
                     corpus_key, log=print)
    leak, free = tables["heldout_leak"], tables["heldout"]
    test, train = idx[::5], np.setdiff1d(idx, idx[::5])
    tokens = {i: torch.from_numpy(windows[np.array([i])]) for i in idx}
    with torch.no_grad():
        hidden = {i: lower_hidden(model, tokens[i][:, :-1], adapter.first_layer) for i in idx}

    def loss(i: int, random: bool = False, table=leak) -> torch.Tensor:
        ids, valid = table.get(table.chunks_of_windows(np.array([i]), SEQ))
        if random:
            ids = torch.randint(100, model.config.vocab_size, ids.shape)
        with adapter.attached_reading(model, ids, valid):
            x = hidden[i]
            logits = model.output(model.forward_embeds(x, torch.arange(x.shape[1]), layers=slice(adapter.first_layer, None)))
        return torch.nn.functional.cross_entropy(logits[0, CHUNK - 1 :].float(), tokens[i][0, CHUNK:])

    gates = [q for n, q in adapter.named_parameters() if n.endswith("gate")]
    rest = [q for n, q in adapter.named_parameters() if not n.endswith("gate")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": gates, "lr": args.lr * args.gate_lr_scale}], lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    rng, t0 = np.random.default_rng(0), time.perf_counter()
    print(f"{len(train)} train / {len(test)} test windows, CCA layers {list(config.layers)}")
    for step in range(args.steps + 1):
        if step % 10 == 0:
            with torch.no_grad():
                a = np.mean([float(loss(i)) for i in test])
                r = np.mean([float(loss(i, random=True)) for i in test])
                f = np.mean([float(loss(i, table=free)) for i in test])
            print(f"step {step} ({time.perf_counter() - t0:.0f} s): test loss with its own text as neighbours {a:.3f}, "
                  f"with random neighbours {r:.3f}, leak-free neighbours {f:.3f}; per layer, heads' tanh(gate) "
                  f"{ {i: [round(float(t), 2) for t in torch.tanh(g.detach())] for i, g in zip(config.layers, gates)} }",
                  flush=True)
        if step == args.steps:
            break
        opt.zero_grad()
        (sum(loss(i) for i in rng.choice(train, 2, replace=False)) / 2).backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()


if __name__ == "__main__":
    main()
