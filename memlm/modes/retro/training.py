"""RETRO's training data: the corpus as a store collection, and every training chunk's neighbours.

- `corpus_store(corpus, folder)`: a MemoryStore in `folder` whose collection "corpus" holds every
  train and held-out document of the training corpus (ids "train/<d>", "heldout/<d>", metadata
  {"split": ...}), chunked and embedded as any collection (64-token chunks, the store's embedder).
  Built once, resumable (documents go in in a fixed order; a restart continues after the last
  batch acknowledged).
- `NeighbourTable`: the neighbours of every m-token chunk of a split's token stream (chunk g is
  tokens[g*m : (g+1)*m]; a window of `seq` tokens starting at i*seq holds chunks i*seq/m ..), found
  by `memlm.modes.retro.neighbours.search_neighbours` with the chunk's text, kept in memory-mapped
  arrays and filled on demand. Training tables exclude the chunk's own documents (RETRO's leakage
  rule) and only search train documents (held-out text never reaches training); the held-out table
  used for leak-free evaluation excludes own documents too, the leakage table does not.
  A filled table is read without the store: the GPU machine (no faiss, no lmdb) trains from one
  filled here.
- `copy_repeats`: how often each training window comes per epoch. Leak-free neighbours rarely hold
  what a chunk goes on to say (over the CPU run's 2,048 windows: 10% of next-chunk 4-grams are in
  the chunk's neighbours, and half the windows have under 1%), so the rare windows whose neighbours
  do (license texts, stdlib boilerplate: ~12% of windows with >= 20% overlap) are the only lessons
  in copying from a neighbour; repeating them teaches it sooner. Still leak-free: the neighbours
  are other documents'.
- `plant_spans`: copy lessons that leak-free neighbours cannot give. The CPU runs measured that
  training on leak-free neighbours alone teaches the gates *not* to copy: the base layers' own
  heads that copy a stated fact (untrained gates at 0.5 answer the pass-key question) are gated
  down or negative, because a neighbour from another document is rarely what follows. RETRO's 2T
  token store holds near-duplicates that reward copying; this corpus does not. So for a fraction
  of chunks, a near-duplicate passage is written into neighbour 0 of chunk u at a random offset:
  a span of the text the chunk's readers predict (chunk u + 1) after the few tokens just before
  it, so that it is found by what the decoder has just read. (A span without that context, the
  first form, taught copying in mid-neighbour but not of a fact at a neighbour's start.) The
  store's retrieval is still leak-free; the passage is the training-time stand-in for a
  near-duplicate.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from memlm.modes.retro.model import RetroConfig
from memlm.train.corpus import Corpus, TokenSplit

COLLECTION = "corpus"
INGEST_BATCH = 64  # documents per Ingest call while building the store


def split_documents(split: TokenSplit, name: str, tokenizer) -> list[tuple[str, str]]:
    """(doc id, text) of every document of the split, text decoded from its tokens."""
    out = []
    for d in range(split.n_docs):
        toks = split.tokens[split.doc_starts[d] : split.doc_starts[d + 1]]
        out.append((f"{name}/{d}", tokenizer.decode(toks.tolist(), skip_special_tokens=True)))
    return out


def corpus_store(corpus: Corpus, folder: Path, tokenizer, log: Callable[[str], None] = print):
    """The MemoryStore in folder with the whole corpus in COLLECTION (built, or finished, now)."""
    from memlm.config import StoreSettings
    from memlm.index.memory_store import MemoryStore
    from memlm.index.types import Document

    store = MemoryStore.open(folder, StoreSettings(), tokenizer=tokenizer)
    store.ensure_collection(COLLECTION)
    docs = [(i, t, "train") for i, t in split_documents(corpus.train, "train", tokenizer)]
    docs += [(i, t, "heldout") for i, t in split_documents(corpus.heldout, "heldout", tokenizer)]
    have = store.describe(COLLECTION).documents
    if have < len(docs):
        log(f"retro: putting the corpus into {folder} ({have}/{len(docs)} documents there)")
        t0 = time.perf_counter()
        for lo in range(have - have % INGEST_BATCH, len(docs), INGEST_BATCH):
            batch = [Document(i, t, {"split": s}) for i, t, s in docs[lo : lo + INGEST_BATCH] if t.strip()]
            store.ingest(COLLECTION, batch)
            done = min(lo + INGEST_BATCH, len(docs))
            if done % (INGEST_BATCH * 10) == 0 or done == len(docs):
                log(f"  {done}/{len(docs)} documents, {time.perf_counter() - t0:.0f} s")
    return store


class NeighbourTable:
    """Neighbours of the m-token chunks of one split's stream, in FOLDER: ids.npy (n, k, r) int32,
    lengths.npy (n, k) int16 (0: no neighbour), filled.npy (n,) bool, meta.json what it was built for."""

    def __init__(self, folder: Path, split: TokenSplit, split_name: str, config: RetroConfig, key: dict[str, Any],
                 exclude_own: bool = True, train_only: bool = True):
        self.folder, self.split, self.split_name, self.config = Path(folder), split, split_name, config
        self.exclude_own, self.train_only = exclude_own, train_only
        m, k, r = config.chunk_tokens, config.neighbours, config.neighbour_length
        self.n = len(split.tokens) // m
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"split": split_name, "chunks": self.n, "chunk_tokens": m, "k": k, "r": r,
                "neighbour_tokens": config.neighbour_tokens, "exclude_own": exclude_own, "train_only": train_only, **key}
        meta_path = self.folder / "meta.json"
        if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
            raise ValueError(f"neighbour table {self.folder} was built for {json.loads(meta_path.read_text())}, "
                             f"not {meta}: remove it")
        meta_path.write_text(json.dumps(meta))
        self.ids = self._memmap("ids.npy", np.int32, (self.n, k, r))
        self.lengths = self._memmap("lengths.npy", np.int16, (self.n, k))
        path = self.folder / "filled.npy"
        self.filled = np.load(path) if path.is_file() else np.zeros(self.n, bool)

    def _memmap(self, name: str, dtype, shape):
        path = self.folder / name
        if path.is_file():
            return np.lib.format.open_memmap(path, mode="r+")
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def chunks_of_windows(self, idx: np.ndarray, seq: int) -> np.ndarray:
        """(B, seq // m) chunk indices of windows idx (window i starts at token i * seq)."""
        m = self.config.chunk_tokens
        if seq % m:
            raise ValueError(f"seq={seq} must be a multiple of chunk_tokens={m}")
        return np.asarray(idx, np.int64)[:, None] * (seq // m) + np.arange(seq // m)

    def _own_docs(self, g: int) -> set[str]:
        m, starts = self.config.chunk_tokens, self.split.doc_starts
        first = int(np.searchsorted(starts, g * m, side="right")) - 1
        last = int(np.searchsorted(starts, (g + 1) * m - 1, side="right")) - 1
        return {f"{self.split_name}/{d}" for d in range(max(first, 0), min(last, self.split.n_docs - 1) + 1)}

    def fill(self, chunks: np.ndarray, store, tokenizer, batch: int = 256, log: Callable[[str], None] = print) -> None:
        """Search the neighbours of the chunks not filled yet (durably: arrays flushed, then filled.npy)."""
        from memlm.modes.retro.neighbours import search_neighbours

        todo = np.unique(np.asarray(chunks, np.int64).ravel())
        todo = todo[~self.filled[todo]]
        if not len(todo):
            return
        m = self.config.chunk_tokens
        t0 = time.perf_counter()
        flt = {"split": "train"} if self.train_only else None
        extra = 8 if self.exclude_own else 0
        for lo in range(0, len(todo), batch):
            part = todo[lo : lo + batch]
            texts = [tokenizer.decode(self.split.tokens[g * m : (g + 1) * m].tolist(), skip_special_tokens=True) for g in part]
            keep = [j for j, t in enumerate(texts) if t.strip()]
            found = search_neighbours(store, COLLECTION, [texts[j] for j in keep], self.config, filter=flt, extra=extra,
                                      exclude_docs=[self._own_docs(int(part[j])) if self.exclude_own else set() for j in keep])
            self.ids[part], self.lengths[part] = 0, 0
            for j, (ids, valid, _) in zip(keep, found):
                self.ids[part[j]] = ids
                self.lengths[part[j]] = valid.sum(-1)
            self.ids.flush()
            self.lengths.flush()
            self.filled[part] = True
            tmp = self.folder / "filled.tmp.npy"
            np.save(tmp, self.filled)
            os.replace(tmp, self.folder / "filled.npy")
            if lo // batch % 10 == 9 or lo + batch >= len(todo):
                done = min(lo + batch, len(todo))
                log(f"  {self.split_name} neighbours: {done}/{len(todo)} chunks, {time.perf_counter() - t0:.0f} s")

    def get(self, chunks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """chunks (...) -> ids (..., k, r) int64, valid (..., k, r) bool. Every chunk must be filled."""
        chunks = np.asarray(chunks, np.int64)
        if not self.filled[chunks].all():
            raise ValueError(f"neighbour table {self.folder}: {int((~self.filled[chunks]).sum())} chunks not filled")
        ids = torch.from_numpy(np.asarray(self.ids[chunks], np.int64))
        lengths = torch.from_numpy(np.asarray(self.lengths[chunks], np.int64))
        valid = torch.arange(self.config.neighbour_length) < lengths[..., None]
        return ids, valid


def neighbour_overlap(table: NeighbourTable, chunks: np.ndarray, n: int = 4) -> np.ndarray:
    """For each chunk g of `chunks` (...): the fraction of the n-grams ending in chunk g + 1 (the
    tokens its neighbours are read by) that occur in g's neighbours. The last chunk of the split
    scores 0."""
    m, tokens = table.config.chunk_tokens, table.split.tokens
    flat = np.asarray(chunks, np.int64).ravel()
    ids, valid = table.get(flat)
    out = np.zeros(len(flat))
    for j, g in enumerate(flat):
        if (g + 2) * m > len(tokens):
            continue
        seen = set()
        for row, ok in zip(ids[j].tolist(), valid[j].tolist()):
            row = row[: sum(ok)]
            seen.update(tuple(row[i : i + n]) for i in range(len(row) - n + 1))
        after = tokens[(g + 1) * m - n + 1 : (g + 2) * m].tolist()
        out[j] = sum(tuple(after[i : i + n]) in seen for i in range(len(after) - n + 1)) / m
    return out.reshape(np.shape(chunks))


def copy_repeats(table: NeighbourTable, windows: np.ndarray, seq: int, repeat: int, threshold: float = 0.2) -> np.ndarray:
    """Per window of `windows`: `repeat` if its chunks' mean neighbour overlap is >= threshold, else 1."""
    if repeat <= 1:
        return np.ones(len(windows), np.int64)
    overlap = neighbour_overlap(table, table.chunks_of_windows(windows, seq)).mean(-1)
    return np.where(overlap >= threshold, repeat, 1).astype(np.int64)


def table_folder(root: Path, split_name: str, corpus_key: str, config: RetroConfig, store_key: str, leak: bool) -> Path:
    m, k = config.chunk_tokens, config.neighbours
    return Path(root) / f"{split_name}-{'leak' if leak else 'noleak'}-m{m}-k{k}-r{config.neighbour_length}-{corpus_key[:8]}-{store_key[:8]}"


def plant_spans(ids: torch.Tensor, valid: torch.Tensor, tokens: np.ndarray, chunks: np.ndarray, m: int,
                fraction: float, rng: np.random.Generator, lengths: tuple[int, int] = (8, 24),
                context: tuple[int, int] = (4, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """ids/valid (B, n, k, r) of chunks (B, n) of the split's stream `tokens`: for each chunk
    (but a window's last) with probability `fraction`, a near-duplicate passage written into
    neighbour 0 at a random offset (its valid length grown to cover it): a span of L ~ U[lengths]
    tokens of the next chunk (from its first token half the time, else from a random one) with
    the C ~ U[context] tokens just before it in the stream in front, so that the passage can be
    found by what the decoder has just read (the way a copy of the document in the store is)."""
    ids, valid = ids.clone(), valid.clone()
    B, n, _, r = ids.shape
    for b in range(B):
        for u in range(n - 1):
            if rng.random() >= fraction:
                continue
            g = int(chunks[b, u])
            L = int(rng.integers(lengths[0], lengths[1] + 1))
            C = int(rng.integers(context[0], context[1] + 1))
            s = 0 if rng.random() < 0.5 else int(rng.integers(0, m - L + 1))
            start = (g + 1) * m + s  # the span's first token in the stream
            passage = torch.from_numpy(np.asarray(tokens[start - C : start + L], np.int64))
            P = len(passage)
            have = int(valid[b, u, 0].sum())
            o = int(rng.integers(0, max(have, P) - P + 1))
            ids[b, u, 0, o : o + P] = passage
            valid[b, u, 0, : max(have, o + P)] = True
    return ids, valid


def batch_neighbours(tables: dict[str, NeighbourTable], seq: int, device: torch.device,
                     spans: Optional[dict[str, float]] = None, seed: int = 0) -> Callable[[str, np.ndarray], dict]:
    """The trainer's per-batch extra data: {split: table} -> fn(split, window idx) -> the RetroBatch
    fields. `spans` {split: fraction}: plant copy spans (`plant_spans`) in that split's batches
    (train: a fresh draw each visit; others: the same draw each evaluation)."""
    spans = spans or {}
    visits = {"n": 0}

    def extra(split: str, idx: np.ndarray) -> dict:
        table = tables[split]
        chunks = table.chunks_of_windows(idx, seq)
        ids, valid = table.get(chunks)  # (B, n, k, r)
        if spans.get(split):
            visits["n"] += split == "train"
            rng = np.random.default_rng([seed, visits["n"] if split == "train" else 0, *np.asarray(idx).tolist()])
            ids, valid = plant_spans(ids, valid, table.split.tokens, chunks, table.config.chunk_tokens, spans[split], rng)
        return {"neighbours": ids.to(device), "neighbour_valid": valid.to(device)}

    return extra


def store_key(folder: Path) -> str:
    """What a neighbour table depends on in the store: its folder, recorded at build."""
    import hashlib

    return hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()


def prepare(corpus: Corpus, config: RetroConfig, tokenizer, root: Path, seq: int, train_idx: np.ndarray,
            heldout_idx: np.ndarray, corpus_key: Callable[[np.ndarray], str], log: Callable[[str], None] = print,
            store_folder: Optional[Path] = None) -> dict[str, NeighbourTable]:
    """Build (or finish) the corpus store and the neighbour tables of the windows a run uses:
    {"train": leak-free train table, "heldout": leak-free held-out table, "heldout_leak": with own
    documents allowed}."""
    store_folder = Path(store_folder or root / "store")
    tables = {
        "train": NeighbourTable(table_folder(root, "train", corpus_key(corpus.train.tokens), config, store_key(store_folder), False),
                                corpus.train, "train", config, {"corpus": corpus_key(corpus.train.tokens)}),
        "heldout": NeighbourTable(table_folder(root, "heldout", corpus_key(corpus.heldout.tokens), config, store_key(store_folder), False),
                                  corpus.heldout, "heldout", config, {"corpus": corpus_key(corpus.heldout.tokens)}),
        "heldout_leak": NeighbourTable(table_folder(root, "heldout", corpus_key(corpus.heldout.tokens), config, store_key(store_folder), True),
                                       corpus.heldout, "heldout", config, {"corpus": corpus_key(corpus.heldout.tokens)},
                                       exclude_own=False, train_only=False),
    }
    need = {"train": tables["train"].chunks_of_windows(train_idx, seq),
            "heldout": tables["heldout"].chunks_of_windows(heldout_idx, seq),
            "heldout_leak": tables["heldout_leak"].chunks_of_windows(heldout_idx, seq)}
    if any(not t.filled[need[n].ravel()].all() for n, t in tables.items()):
        store = corpus_store(corpus, store_folder, tokenizer, log)
        try:
            for name, table in tables.items():
                table.fill(need[name], store, tokenizer, log=log)
        finally:
            store.close()
    return tables
