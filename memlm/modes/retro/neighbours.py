"""A chunk's neighbours from the store: search with the chunk's text, each hit's token ids followed
by the tokens of the chunk after it in its document (RETRO's [N, F]: neighbour and continuation).

The same path serves generation (the live store: a deleted document is gone from the next search)
and training (`memlm.modes.retro.training` precomputes the neighbours of every training chunk,
excluding hits from the chunk's own documents: RETRO's leakage rule)."""
from __future__ import annotations

from typing import Any, Collection, Optional, Sequence

import numpy as np

from memlm.index.types import SearchHit
from memlm.modes.retro.model import RetroConfig


def neighbour_rows(store: Any, collection: str, hits: Sequence[SearchHit], config: RetroConfig,
                   exclude_docs: Collection[str] = ()) -> tuple[np.ndarray, np.ndarray, list[SearchHit]]:
    """The first `config.neighbours` hits not in exclude_docs as neighbours: ids (k, r) int64,
    valid (k, r) bool (a missing neighbour or a short continuation: False), and the hits used."""
    k, r = config.neighbours, config.neighbour_length
    used = [h for h in hits if h.doc_id not in exclude_docs][:k]
    ids, valid = np.zeros((k, r), np.int64), np.zeros((k, r), bool)
    following = [store.following_chunks(collection, h.chunk_id, 1) if config.continuation_tokens else [] for h in used]
    want = [h.chunk_id for h in used] + [f[0] for f in following if f]
    records = {cid: rec for cid, rec in zip(want, store.read_chunks(collection, want, missing_ok=True)) if rec is not None}
    for j, (hit, nxt) in enumerate(zip(used, following)):
        rec = records.get(hit.chunk_id)
        if rec is None:  # deleted between the search and the read
            continue
        toks = neighbour_tokens(rec, records.get(nxt[0]) if nxt else None, config)
        ids[j, : len(toks)], valid[j, : len(toks)] = toks, True
    return ids, valid, [h for h, f in zip(used, following) if h.chunk_id in records]


def neighbour_tokens(record: Any, following: Any, config: RetroConfig) -> np.ndarray:
    """A stored chunk as a neighbour: its first `neighbour_tokens` token ids, then the first
    `continuation_tokens` of the chunk after it in its document (`following`, None at the end).
    A neighbour row is these, zero-padded to r (what the stored neighbour states are keyed by)."""
    toks = np.asarray(record.token_ids, np.int64)[: config.neighbour_tokens]
    if following is not None and config.continuation_tokens:
        toks = np.concatenate([toks, np.asarray(following.token_ids, np.int64)[: config.continuation_tokens]])
    return toks


def search_neighbours(store: Any, collection: str, texts: Sequence[str], config: RetroConfig, *,
                      filter: Any = None, mode: Optional[str] = None, exclude_docs: Sequence[Collection[str]] = (),
                      extra: int = 0) -> list[tuple[np.ndarray, np.ndarray, list[SearchHit]]]:
    """Neighbours of each chunk text (one batched search): `neighbour_rows` per text. `extra` more
    hits are searched for, to make up for those excluded."""
    if not texts:
        return []
    kwargs = {"mode": mode} if mode else {}
    k = config.neighbours + extra
    if hasattr(store, "search_batch"):  # one embedding batch (MemoryStore)
        hit_lists = store.search_batch(collection, queries=list(texts), k=k, filter=filter, **kwargs)
    else:  # any StoreView
        hit_lists = [store.search(collection, query=t, k=k, filter=filter, **kwargs) for t in texts]
    excludes = list(exclude_docs) or [()] * len(texts)
    return [neighbour_rows(store, collection, hits, config, ex) for hits, ex in zip(hit_lists, excludes)]
