"""Corpora for the benchmarks, all seeded or read from disk; nothing is downloaded.

- `documents` / `queries`: short synthetic records (ingest and search benchmarks).
- Long-text corpora for the memory benchmarks (pass key, recall, knn cost), one infinite,
  deterministic stream of text units per kind (`HAYSTACK_KINDS`):
    "filler"  the same five sentences over and over (the classic pass-key haystack);
    "prose"   generated English-like sentences from a small vocabulary (varied, but templated);
    "stdlib"  real, varied English: the docstring paragraphs of this Python's standard library
              source (modules, classes, functions; doctest paragraphs and duplicates dropped), in
              a fixed file order. It depends on the Python version, nothing else.
  `pack_documents` cuts a stream into documents of about `doc_tokens` tokens, the way a memory
  service would receive them; document i never depends on how many documents are asked for, so
  a corpus of 128 documents starts with the corpus of 16.
- `insert_needle`: a sentence put between two units of one document at a chosen depth.
"""
from __future__ import annotations

import functools
import os
import random
import sysconfig
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

_SUBJECTS = "the engineer|a sailor|the old mayor|my neighbour|the committee|a young botanist|the archive|our team".split("|")
_VERBS = "repaired|described|sold|painted|measured|forgot|discovered|catalogued|rebuilt|questioned".split("|")
_OBJECTS = ("the lighthouse|a copper kettle|the northern bridge|seven maps|the harbour wall|a violin|the orchard|"
            "an iron gate|the clock tower|a sailing boat|the museum roof|twelve letters").split("|")
_PLACES = "in Kell|near the river|before winter|after the storm|in 1854|at dawn|in the valley|by the coast".split("|")


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."


def documents(n: int, *, sentences: tuple[int, int] = (4, 6), seed: int = 0) -> list[dict]:
    """`n` documents of `sentences` sentences (about 9 tokens each) with a unique record number."""
    rng = random.Random(seed)
    return [
        {
            "id": f"doc-{i:06d}",
            "text": " ".join(sentence(rng) for _ in range(rng.randint(*sentences))) + f" Record {i}.",
            "metadata": {"shard": i % 8, "kind": rng.choice(["report", "letter", "note"])},
        }
        for i in range(n)
    ]


def queries(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


# --- long-text corpora ------------------------------------------------------------------------

HAYSTACK_KINDS = ("filler", "prose", "stdlib")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_P_SUBJ = ["The old miller", "A young sailor", "The village council", "Her grandmother", "The tired doctor",
           "A travelling merchant", "The quiet librarian", "Our neighbour", "The river pilot", "A clever student"]
_P_VERB = ["carried", "painted", "repaired", "forgot", "discovered", "sold", "borrowed", "described", "measured", "hid"]
_P_OBJ = ["a wooden chest", "the broken lantern", "three copper bowls", "an unfinished map", "the winter coats",
          "a basket of apples", "the harbour records", "a silver whistle", "the bell tower", "a stack of letters"]
_P_WHEN = ["before dawn", "after the storm", "during the festival", "on a cold morning", "late in the evening",
           "while the bread was baking", "as the tide came in", "without telling anyone", "for the second time", "at noon"]
_P_WHY = ["because the roads were flooded", "so that the children could see it", "although nobody asked",
          "since the market was closed", "and then went home", "and everyone laughed", "which surprised the mayor",
          "as the letter had instructed", "to settle an old argument", "and the dogs barked"]

def prose_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_P_SUBJ)} {rng.choice(_P_VERB)} {rng.choice(_P_OBJ)} {rng.choice(_P_WHEN)} {rng.choice(_P_WHY)}."


@functools.lru_cache(maxsize=1)
def stdlib_paragraphs(min_chars: int = 40) -> tuple[str, ...]:
    """Docstring paragraphs of the standard library's .py files, whitespace collapsed, in a fixed
    order (files sorted by path, nodes in `ast.walk` order); ~10k paragraphs, ~330k tokens on
    CPython 3.11. Paragraphs with doctest prompts, shorter than `min_chars`, or seen before are
    dropped. Takes ~5 s (parsing ~600 files). The extraction is memlm.train.corpus's (the training
    corpus uses it too)."""
    from memlm.train.corpus import docstring_paragraphs, stdlib_source_files

    out: list[str] = []
    seen: set[str] = set()
    for path in stdlib_source_files():
        for para in docstring_paragraphs(path):
            if len(para) >= min_chars and ">>>" not in para and para not in seen:
                seen.add(para)
                out.append(para)
    if not out:
        raise RuntimeError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}: "
                           "is the standard library source installed?")
    return tuple(out)


def text_units(kind: str, seed: int = 0) -> Iterator[str]:
    """The endless stream of text units (sentences or paragraphs) of one corpus kind."""
    if kind == "filler":
        while True:
            yield FILLER
    elif kind == "prose":
        rng = random.Random(seed)
        while True:
            yield prose_sentence(rng)
    elif kind == "stdlib":
        paras = stdlib_paragraphs()
        start = seed % len(paras)
        while True:  # wraps around after ~330k tokens
            yield from paras[start:]
            start = 0
    else:
        raise ValueError(f"corpus kind {kind!r} is not one of {HAYSTACK_KINDS}")


def unit_separator(kind: str) -> str:
    return "\n\n" if kind == "stdlib" else " "


@dataclass(frozen=True)
class PackedDocument:
    units: tuple[str, ...]  # the sentences / paragraphs, in order
    separator: str  # what joins them

    @property
    def text(self) -> str:
        return self.separator.join(self.units)


def pack_documents(
    kind: str, n_docs: int, count_tokens: Callable[[str], int], doc_tokens: int = 1000, seed: int = 0
) -> list[PackedDocument]:
    """The first `n_docs` documents of the `kind` stream, each whole units adding up to at most
    ~`doc_tokens` tokens (as counted unit by unit, +1 per separator; the text's own token count
    can differ by a few at the joins). Units longer than half a document are skipped."""
    sep = unit_separator(kind)
    stream = text_units(kind, seed)
    counts: dict[str, int] = {}
    docs: list[PackedDocument] = []
    pending: str | None = None  # the unit that did not fit the previous document
    while len(docs) < n_docs:
        units: list[str] = []
        used = 0
        while True:
            unit = pending if pending is not None else next(stream)
            pending = None
            n = counts.get(unit)
            if n is None:
                n = counts[unit] = count_tokens(unit) + 1
            if n > doc_tokens // 2:
                continue
            if units and used + n > doc_tokens:
                pending = unit  # opens the next document
                break
            units.append(unit)
            used += n
        docs.append(PackedDocument(tuple(units), sep))
    return docs


def documents_for_tokens(doc_token_counts: Sequence[int], n_tokens: int) -> int:
    """How many leading documents make a haystack closest to `n_tokens` tokens (at least one)."""
    total = 0
    for m, c in enumerate(doc_token_counts):
        if m and total + c / 2 > n_tokens:
            return m
        total += c
    if not doc_token_counts or n_tokens - total > doc_token_counts[-1] / 2:
        raise ValueError(f"{len(doc_token_counts)} documents hold {total} tokens, fewer than {n_tokens}: ask for more")
    return len(doc_token_counts)


def needle_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def insert_needle(doc: PackedDocument, fraction: float, needle: str) -> tuple[PackedDocument, int]:
    """`doc` with `needle` as a unit at the unit boundary nearest `fraction` of its units; returns
    (needled document, index of the needle among its units)."""
    at = min(len(doc.units), max(0, round(fraction * len(doc.units))))
    return PackedDocument(doc.units[:at] + (needle,) + doc.units[at:], doc.separator), at


def place_needle(
    docs: Sequence[PackedDocument], doc_token_counts: Sequence[int], depth: float, needle: str,
    count_tokens: Callable[[str], int],
) -> tuple[int, PackedDocument, float]:
    """Put `needle` at about `depth` (0..1) of the haystack made of `docs`, at a unit boundary.

    Returns (index of the needled document, that document with the needle, the needle's actual
    depth: tokens before it over all tokens, counted per document and unit)."""
    total = sum(doc_token_counts)
    target = depth * total
    before = 0
    for i, c in enumerate(doc_token_counts):
        if before + c > target or i == len(docs) - 1:
            break
        before += c
    needled, at = insert_needle(docs[i], (target - before) / max(1, doc_token_counts[i]), needle)
    in_doc = sum(count_tokens(u) + 1 for u in needled.units[:at])
    return i, needled, (before + min(in_doc, doc_token_counts[i])) / max(1, total)


# --- a corpus's KV memory and chunk vectors, cached on disk -----------------------------------

CHUNK_TOKENS = 64  # the store's chunk size (RETRO's 64)
CHUNK_ID_STRIDE = 1000  # chunk id = document index * 1000 + chunk index within the document
CACHE_VERSION = 1


def default_cache_root() -> "os.PathLike":
    from pathlib import Path

    return Path(os.environ.get("MEMLM_BENCH_CACHE", Path.home() / ".cache" / "memlm" / "bench"))


class CorpusMemory:
    """The documents of one corpus kind as a memory service would ingest them: each document cut
    into 64-token chunks (`memlm.index.chunking.Chunker`), its chunks one token stream of a
    `KVMemory` (no context across documents), chunk id = doc * 1000 + j. The KV memory and the
    MiniLM vectors of the chunks are cached under `cache_root` and extended when more leading
    documents are asked for; the folder name hashes everything the stored bytes depend on
    (model, window, overlap, layers, document size, kv_memory.py's source), and each document's
    token ids are checked against the cache, so a stale cache is rebuilt, never reused.

    `trial_memory` clones the cache with hard links: segments are immutable and KVMemory writes
    its manifest as tmp + os.replace, so what a clone writes (tombstones, a new segment) never
    reaches the cache. Its build time is the ingest cost (`kv_seconds`, `kv_tokens`).
    """

    def __init__(self, cache_root, kind: str, model, tokenizer, model_dir, *, window: int = 1024,
                 overlap: int = 128, doc_tokens: int = 1000, layers: "Sequence[int] | None" = None):
        import hashlib
        import json
        from pathlib import Path

        import memlm.index.kv_memory as kv_module
        import memlm.modes.knn.capture as capture_module
        from memlm.index.chunking import Chunker

        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.window, self.overlap, self.doc_tokens = window, overlap, doc_tokens
        from memlm.models.loading import model_facts

        self.layers = list(range(model_facts(model).layers)) if layers is None else sorted(set(layers))
        self.chunker = Chunker(tokenizer, CHUNK_TOKENS)
        # The KV rows depend on the weight format (q4_1's keys are not fp32's): name its layer class.
        weights = type(model.layers[0].attention.wqkv).__name__ if hasattr(model, "layers") else type(model).__name__
        key = json.dumps([CACHE_VERSION, Path(model_dir).name, weights, kind, window, overlap, doc_tokens, self.layers,
                          CHUNK_TOKENS, hashlib.sha1(b"".join(Path(m.__file__).read_bytes() for m in (kv_module, capture_module))).hexdigest()])
        self.folder = Path(cache_root) / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        self._docs: list[PackedDocument] = []
        self._chunks: list[list[tuple[int, ...]]] = []  # per document: token ids of each chunk

    # --- documents ----------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return self.chunker.count_tokens(text)

    def documents(self, n: int) -> list[PackedDocument]:
        if len(self._docs) < n:
            self._docs = pack_documents(self.kind, n, self.count_tokens, self.doc_tokens)
            self._chunks = [self.chunk(d) for d in self._docs]
        return self._docs[:n]

    def chunk(self, doc: PackedDocument) -> list[tuple[int, ...]]:
        return [c.token_ids for c in self.chunker.chunk(doc.text)]

    def chunks(self, i: int) -> list[tuple[int, ...]]:
        self.documents(i + 1)
        return self._chunks[i]

    def token_counts(self, n: int) -> list[int]:
        self.documents(n)
        return [sum(len(c) for c in self._chunks[i]) for i in range(n)]

    def documents_for_tokens(self, n_tokens: int) -> int:
        """Leading documents that make a haystack of about n_tokens (generates enough of them)."""
        n = max(2, int(n_tokens / (0.85 * self.doc_tokens)) + 2)
        return documents_for_tokens(self.token_counts(n), n_tokens)

    def _doc_hash(self, i: int) -> str:
        import hashlib

        return hashlib.sha1(repr(self.chunks(i)).encode()).hexdigest()

    def _hashes(self, n: int) -> list[str]:
        self.documents(n)
        return [self._doc_hash(i) for i in range(n)]

    # --- cache bookkeeping --------------------------------------------------------------------

    def _meta_path(self):
        return self.folder / "corpus.json"

    def _read_meta(self) -> dict:
        import json

        try:
            return json.loads(self._meta_path().read_text())
        except FileNotFoundError:
            return {"doc_sha1": [], "kv_seconds": 0.0, "kv_tokens": 0, "vec_docs": 0, "vec_seconds": 0.0}

    def _write_meta(self, meta: dict) -> None:
        import json

        tmp = self.folder / ".corpus.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self._meta_path())

    def _memory_folder(self):
        return self.folder / "kv"

    def _built_docs(self) -> int:
        """Leading documents whose K/V are in the cache and match today's documents; wipes a
        cache that does not match."""
        import shutil

        import numpy as np

        from memlm.index.kv_memory import KVMemory

        from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model

        if not (self._memory_folder() / "manifest.json").exists():
            return 0
        meta = self._read_meta()
        docs = np.unique(KVMemory.open(self._memory_folder()).chunk_ids() // CHUNK_ID_STRIDE)
        n = len(docs)
        ok = (n == 0 or (docs[0] == 0 and docs[-1] == n - 1)) and meta["doc_sha1"][:n] == self._hashes(n)
        if not ok:
            print(f"  cache {self.folder} does not match today's documents: rebuilding it", flush=True)
            shutil.rmtree(self.folder)
            return 0
        return n

    # --- building -----------------------------------------------------------------------------

    def ensure_kv(self, n_docs: int, batch_docs: int = 16) -> dict:
        """Build the K/V of documents up to n_docs (one segment per `batch_docs`). Returns the
        cache's ingest facts: {"docs", "tokens", "seconds" (all builds so far), "built_now",
        "bytes_per_token"}."""
        import time

        from memlm.index.kv_memory import KVMemory

        from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model

        have = self._built_docs()  # wipes a stale cache
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self._read_meta()
        if have == 0:
            meta.update(kv_seconds=0.0, kv_tokens=0)
            stale = [p for p in self.folder.parent.glob(f"{self.kind}-*") if p != self.folder]
            if stale:
                gb = sum(f.stat().st_size for p in stale for f in p.rglob("*") if f.is_file()) / 1e9
                print(f"  note: {len(stale)} older caches of {self.kind} ({gb:.1f} GB) in {self.folder.parent}, "
                      "for other settings or an older kv_memory.py / capture.py; remove them by hand if unused", flush=True)
            mem = kv_memory_for_model(self._memory_folder(), self.model, layers=self.layers,
                                     window=self.window, overlap=self.overlap)
        else:
            mem = KVMemory.open(self._memory_folder())
        built_now = 0
        for lo in range(have, n_docs, batch_docs):
            hi = min(n_docs, lo + batch_docs)
            # Intent first: the hashes of what is about to be built (a crash leaves them unused).
            meta["doc_sha1"] = self._hashes(max(hi, len(meta["doc_sha1"])))
            self._write_meta(meta)
            lists, ids, owners = [], [], []
            for i in range(lo, hi):
                for j, c in enumerate(self.chunks(i)):
                    lists.append(c)
                    ids.append(i * CHUNK_ID_STRIDE + j)
                    owners.append(i)
            t0 = time.perf_counter()
            rows = build_kv_memory(mem, self.model, lists, ids, documents=owners)
            dt = time.perf_counter() - t0
            meta["kv_seconds"] += dt
            meta["kv_tokens"] += rows
            self._write_meta(meta)
            built_now += rows
            print(f"  [{self.kind}] KV memory: documents {lo}-{hi - 1} built, {rows} tokens in {dt:.1f} s "
                  f"({rows / dt:.0f} tokens/s)", flush=True)
        return {"docs": n_docs, "tokens": meta["kv_tokens"], "seconds": meta["kv_seconds"], "built_now": built_now,
                "bytes_per_token": mem.bytes_per_token}

    def ensure_vectors(self, n_docs: int, embedder) -> dict:
        """MiniLM vectors of every chunk of documents up to n_docs, cached as vectors.npy."""
        import time

        import numpy as np

        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self._read_meta()
        path = self.folder / "vectors.npy"
        have = meta["vec_docs"] if path.exists() else 0
        if have and meta["doc_sha1"][:have] != self._hashes(have):
            have = 0
        old = np.load(path)[: sum(len(self.chunks(i)) for i in range(have))] if have else np.zeros((0, embedder.dim), np.float32)
        if have < n_docs:
            texts = [self.tokenizer.decode(c) for i in range(have, n_docs) for c in self.chunks(i)]
            t0 = time.perf_counter()
            new = embedder.embed(texts)
            dt = time.perf_counter() - t0
            print(f"  [{self.kind}] chunk vectors: documents {have}-{n_docs - 1}, {len(texts)} chunks in {dt:.1f} s",
                  flush=True)
            with open(self.folder / ".vectors.npy.tmp", "wb") as f:
                np.save(f, np.concatenate([old, new]))
            os.replace(self.folder / ".vectors.npy.tmp", path)
            meta = self._read_meta()
            meta["doc_sha1"] = self._hashes(max(n_docs, len(meta["doc_sha1"])))
            meta["vec_docs"], meta["vec_seconds"] = n_docs, (meta["vec_seconds"] if have else 0.0) + dt
            self._write_meta(meta)
        return {"docs": n_docs, "seconds": meta["vec_seconds"]}

    def vectors(self, n_docs: int) -> "tuple[np.ndarray, list[tuple[int, int]]]":
        """(C, dim) vectors of the chunks of the first n_docs documents and (doc, chunk) of each row."""
        import numpy as np

        self.documents(n_docs)
        where = [(i, j) for i in range(n_docs) for j in range(len(self.chunks(i)))]
        return np.load(self.folder / "vectors.npy", mmap_mode="r")[: len(where)], where

    def trial_memory(self, dst, n_docs: int, drop: Sequence[int] = (),
                     extra: Sequence[tuple[int, Sequence[tuple[int, ...]]]] = ()):
        """A KVMemory at dst holding exactly documents [0, n_docs) minus `drop`, plus each
        (chunk id base, chunks) of `extra` as its own document (built now). The cache must hold
        n_docs documents (`ensure_kv`)."""
        import shutil

        from memlm.index.kv_memory import KVMemory

        from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model

        shutil.copytree(self._memory_folder(), dst, copy_function=os.link)
        mem = KVMemory.open(dst)
        built = int(mem.chunk_ids().max()) // CHUNK_ID_STRIDE + 1 if len(mem.chunk_ids()) else 0
        if built < n_docs:
            raise ValueError(f"the cache holds {built} documents, {n_docs} asked for: call ensure_kv first")
        self.documents(built)
        gone = [i for i in range(n_docs, built)] + list(drop)
        mem.delete(i * CHUNK_ID_STRIDE + j for i in gone for j in range(len(self.chunks(i))))
        for base, chunks in extra:
            build_kv_memory(mem, self.model, list(chunks), [base + j for j in range(len(chunks))], documents=[base] * len(chunks))
        return mem
