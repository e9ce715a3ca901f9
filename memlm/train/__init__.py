"""Training trained memory modes on a frozen owned `Llama` (`memlm train MODE`).

- `memlm.train.adapter`: the `Adapter` protocol a mode implements, and the proof adapter.
- `memlm.train.trainer`: `TrainConfig`, `Trainer` (AdamW groups, warmup+cosine, accumulation,
  evaluation, checkpoints, exact resume).
- `memlm.train.data`: windows over a token stream, their seeded order, the hidden-state cache.
- `memlm.train.corpus`: the offline training corpus (stdlib docstrings, man pages, /usr/share/doc).
- `memlm.train.weights`: adapter safetensors + manifest, refusing another base model.
- `memlm.train.cli`: the `memlm train` sub-commands.

Nothing here imports faiss, lmdb or memlm.index (the GPU machine has neither); submodules are
imported by name, so `import memlm.train.corpus` does not import torch.
"""
