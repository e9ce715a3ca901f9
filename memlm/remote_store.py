"""`RemoteStore`: the `StoreView` (memlm.modes.base) of a memlm server's store, over gRPC, so a
model host in another process can serve every memory mode against it — knn included: its KV
memory lives in that host's own folder (`memory_dir`) and follows the store's change log by
watermark, as it does in process.

    store = RemoteStore(memlm.Client("10.0.0.5:50051"), memory_dir=Path("/var/lib/memlm-engine"))
    host = ModelHost.load(memory=store)

Writes are not pushed to the host: a knn read catches its memory up (one ReadChanges call when
in step) before it generates, so it still sees every write acknowledged before it.
Client-side only (no torch, lmdb or faiss).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from memlm.client import Client
from memlm.index.types import CollectionConfig, Filter, SearchHit

CHUNKS_PER_CALL = 2000
CHANGES_PER_CALL = 10_000


@dataclass(frozen=True)
class RemoteChunk:
    """A stored chunk as ReadChunks returns it (the fields memory modes read of a ChunkRecord)."""

    doc_id: str
    chunk_index: int
    text: str
    token_ids: np.ndarray  # (n,) int32


class RemoteStore:
    """StoreView over a `memlm.Client`. `memory_dir`: where this host keeps derived memory."""

    stopping = False

    def __init__(self, client: Client, memory_dir: Path):
        self.client = client
        self.memory_dir = Path(memory_dir)

    def collection_config(self, name: str) -> CollectionConfig:
        return self.client.describe_collection(name).config

    def list_collections(self) -> list[CollectionConfig]:
        return self.client.list_collections()

    def search(self, collection: str, query: Optional[str] = None, vector: Optional[np.ndarray] = None,
               k: int = 10, filter: Optional[Filter] = None, mode: Optional[str] = None) -> list[SearchHit]:
        return self.client.search(query if query is not None else vector, collection=collection, k=k,
                                  filter=filter, mode=mode)

    def read_chunks(self, collection: str, chunk_ids: Sequence[int], missing_ok: bool = False) -> list[Optional[RemoteChunk]]:
        out: list[Optional[RemoteChunk]] = []
        ids = [int(c) for c in chunk_ids]
        for lo in range(0, len(ids), CHUNKS_PER_CALL):
            for m in self.client.read_chunks(ids[lo : lo + CHUNKS_PER_CALL], collection=collection, missing_ok=missing_ok):
                out.append(RemoteChunk(m.doc_id, m.chunk_index, m.text, np.asarray(m.token_ids, dtype=np.int32))
                           if m.found else None)
        return out

    def following_chunks(self, collection: str, chunk_id: int, n: int) -> list[int]:
        return self.client.following_chunks(chunk_id, n, collection=collection)

    def chunk_ids(self, collection: str) -> np.ndarray:
        pages, after = [], None
        while True:
            page = self.client.chunk_ids_page(collection=collection, after=after)
            pages.append(page)
            if len(page) < 100_000:
                return np.concatenate(pages) if pages else np.zeros(0, dtype=np.int64)
            after = int(page[-1])

    def last_seq(self, collection: str) -> int:
        return self.client.read_changes(collection=collection, after_seq=0, limit=0).last_seq

    def changes(self, collection: str, after_seq: int, upto_seq: int) -> Optional[list[tuple[int, list[int], list[int]]]]:
        out: list[tuple[int, list[int], list[int]]] = []
        after = after_seq
        while after < upto_seq:
            reply = self.client.read_changes(collection=collection, after_seq=after, upto_seq=upto_seq, limit=CHANGES_PER_CALL)
            if reply.truncated:
                return None
            if not reply.changes:
                break
            out.extend((c.seq, list(c.added), list(c.removed)) for c in reply.changes)
            after = out[-1][0]
        return out

    def set_watermark(self, collection: str, mode: str, seq: int) -> None:
        self.client.set_watermark(collection, mode, seq)

    def memory_folder(self, collection: str) -> Path:
        """Where this host keeps a collection's derived memory (its own disk, not the store's)."""
        return self.memory_dir / "collections" / collection
