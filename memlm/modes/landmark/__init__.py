"""The `landmark` memory mode: each query head reads the memory blocks its own attention picks
(Landmark Attention's block retrieval; training-free for now: by default a block scores as its
best row, exact, FAISS on CPU for big memories; InfLLM-like mean keys and Quest's min/max bounds
are options, measured far less accurate on this model: README, landmark).

- settings.py  `Settings` (blocks per head, block representation, positions, build limits),
               `CollectionOptions` (knn's KV memory options: what the block memory stores)
- mode.py      the mode: the block memory kept in step (knn's `KVMemoryManager`, folder
               `kv-landmark/`), loaded as blocks, the generation context, citations
- blocks.py    `BlockKV` (block scoring, top-k, the blocks' rows for memory attention, the
               attention share per block the citations rank by), `load_block_memories`
"""
