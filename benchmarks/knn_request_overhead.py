"""What keeping the KV memory in step costs a knn request, against the collection's size: the
watermark check (`KVMemoryManager.catch_up` with the memory in step: one LMDB record read) next
to the chunk-id comparison every knn request ran before watermarks (`_sync`: every chunk id of
LMDB against every row's chunk id of the memory), in the same process, for collections of
--sizes chunks.

The collections are real (MemoryStore.ingest: 16-token chunks, embedded by MiniLM). Their KV
memory is a real `KVMemory` folder holding one row per token of every chunk, written with a
1-layer, 1-head, 1-dim shape: neither path reads keys or values, only chunk ids, so the figures
are those of a full-size memory's bookkeeping (a SmolLM2 memory of 100k 16-token chunks would
be ~37 GB, not buildable on these machines).

    .venv/bin/python benchmarks/knn_request_overhead.py [--sizes 10000 100000] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memlm.config import StoreSettings
from memlm.index.kv_memory import KVMemory
from memlm.index.memory_store import MemoryStore
from memlm.index.types import Document
from memlm.modes.knn.memories import KV_FOLDER, KVMemoryManager


class _Shape:
    """What KVMemoryManager reads of a model when nothing is built (the layer count)."""

    class config:
        num_hidden_layers = 30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from memlm.index.embedding import load_embedder
    from memlm.models.loading import bundled_model_dir, load_tokenizer

    tokenizer, embedder = load_tokenizer(bundled_model_dir()), load_embedder("all-MiniLM-L6-v2")
    print(f"{'chunks':>8s} {'rows':>10s} {'watermark check ms':>19s} {'id comparison ms':>17s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory() as td:
        store = MemoryStore.open(Path(td) / "data", StoreSettings(min_chunk_tokens=16, default_chunk_tokens=16),
                                 embedder=embedder, tokenizer=tokenizer)
        store.create_collection("kv", memory={"knn": {}})
        have = 0
        for size in sorted(args.sizes):
            t0 = time.perf_counter()
            while (n := len(store.chunk_ids("kv"))) < size:  # ~2 chunks per document
                batch = [Document(f"d{have + i}", f"Entry {have + i}: the tide at the northern harbour rose "
                                  f"{(have + i) % 97} centimetres above the mark before noon.") for i in range(500)]
                store.ingest("kv", batch)
                have += len(batch)
            ingest_s = time.perf_counter() - t0
            ids = store.chunk_ids("kv")
            folder = store.memory_folder("kv") / KV_FOLDER
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            mem = KVMemory.create(folder, [1], 1, 1)
            rows = np.repeat(ids, 16)  # 16 tokens per chunk
            one = torch.zeros(1, len(rows), 1)
            mem.add({1: one}, {1: one}, rows, np.tile(np.arange(16, dtype=np.int32), len(ids)))
            mem.set_applied_seq(store.last_seq("kv"))
            manager = KVMemoryManager(store, _Shape(), model_name=store.tokenizer_name)
            config = store.collection_config("kv")
            manager.memory("kv", config)

            def timed(fn) -> float:
                out = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - t) * 1000)
                return statistics.median(out)

            check = timed(lambda: manager.catch_up("kv", config))
            compare = timed(lambda: manager._sync("kv", config, manager.memory("kv", config), None))
            print(f"{len(ids):8d} {len(rows):10d} {check:19.3f} {compare:17.1f} {compare / check:7.0f}x"
                  f"   (ingest of the collection: {ingest_s:.0f} s)")
        store.close()


if __name__ == "__main__":
    main()
