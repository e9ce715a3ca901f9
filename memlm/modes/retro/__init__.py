"""The `retro` memory mode: RETRO's chunked cross-attention over each completed chunk's neighbours,
retro-fitted on the frozen owned Llama.

- settings.py    `Settings` (the server's section), `CollectionOptions` (what `--memory retro` stores)
- mode.py        the mode: validation, the generation hooks (neighbours searched as chunks complete)
- model.py       `RetroConfig`, the neighbour encoder, `ChunkedCrossAttention`, `RetroState`
- adapter.py     `RetroAdapter`: the trainable modules, attached to the model per request
- neighbours.py  a chunk's neighbours from the store (search, continuation, leakage exclusions)
- state_cache.py `NeighbourStateCache`: neighbours' base states kept in memory across generations
- memory.py      `NeighbourStateMemory` + `NeighbourStateManager`: every chunk's states on disk, in
                 step with the store (memlm.modes.derived_memory); `StoredFirst` reads them
- training.py    `memlm train retro`: corpus store, neighbour tables, the RETRO-fitting task
"""
