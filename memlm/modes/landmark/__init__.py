"""The `landmark` memory mode: each query head reads the memory blocks its own attention picks
(Landmark Attention's block retrieval; training-free for now, InfLLM / Quest style).

- settings.py  `Settings` (blocks per head, block representation, positions, build limits),
               `CollectionOptions` (knn's KV memory options: what the block memory stores)
- mode.py      the mode: the block memory kept in step (knn's `KVMemoryManager`, folder
               `kv-landmark/`), loaded as blocks, the generation context, citations
- blocks.py    `BlockKV` (block scoring, top-k, the blocks' rows for memory attention),
               `load_block_memories`
"""
