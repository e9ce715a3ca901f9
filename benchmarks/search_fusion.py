"""Hybrid search quality: dense, lexical and each way of fusing them, per kind of query.

    python benchmarks/search_fusion.py [--docs 1500] [--per-kind 40]

The corpus is real text: short docstring paragraphs of this Python's standard library
(`corpus.stdlib_paragraphs`), one document each, in an in-process `MemoryStore`. Queries come in
four kinds, each with one right document:
- entity:     an invented name (seeded syllables) written into one document ("According to
              Vorlak Tessimund, ..."), asked about by name ("What did Vorlak Tessimund say?");
              every entity document has the same opening, so only the name tells them apart.
- code:       an identifier or constant that occurs in that document alone (snake_case or
              ALL_CAPS words: `max_size`, `EINTR`), asked as "What is <code>?".
- paraphrase: a document's first sentence with its words swapped for synonyms, keeping only
              queries that then share no indexed word with the document (lexical can only
              guess).
- topical:    a document's first sentence, removed from the document, as the query: both
              rankings have something to go on ("no worse elsewhere").
Each query is searched once dense and once lexical over every chunk, through the store; every
fusion variant is then computed from the top of those two lists with `memlm.index.fusion` (the
"absolute" ones score every candidate by both rankers, as the store does), and the store's own
hybrid search (its `fusion` setting) runs beside them as a check. Printed per kind: top-1 (the
right document first) and recall@10 (among the first 10 hits), over --per-kind queries; then the
mean time of one search through the store, dense alone and hybrid with each fusion method.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from corpus import stdlib_paragraphs  # noqa: E402

KINDS = ("entity", "code", "paraphrase", "topical")

# Synonyms for common docstring words; a paraphrase query uses only words absent from its document.
SYNONYMS = {
    "return": "give back", "returns": "gives back", "returned": "handed back", "function": "routine",
    "functions": "routines", "file": "document", "files": "documents", "string": "text", "strings": "texts",
    "list": "sequence", "lists": "sequences", "error": "failure", "errors": "failures", "raise": "throw",
    "raises": "throws", "raised": "thrown", "create": "make", "creates": "makes", "created": "made",
    "object": "instance", "objects": "instances", "value": "quantity", "values": "quantities", "number": "count",
    "argument": "parameter", "arguments": "parameters", "default": "fallback", "method": "operation",
    "methods": "operations", "class": "type", "classes": "types", "read": "load", "reads": "loads",
    "write": "save", "writes": "saves", "written": "saved", "name": "label", "names": "labels", "set": "assign",
    "sets": "assigns", "get": "fetch", "gets": "fetches", "data": "information", "directory": "folder",
    "directories": "folders", "path": "location", "paths": "locations", "test": "check", "tests": "checks",
    "called": "invoked", "call": "invoke", "calls": "invokes", "used": "employed", "use": "employ",
    "uses": "employs", "given": "supplied", "new": "fresh", "empty": "blank", "true": "yes", "false": "no",
    "start": "begin", "starts": "begins", "end": "finish", "ends": "finishes", "remove": "delete",
    "removes": "deletes", "add": "append", "adds": "appends", "line": "row", "lines": "rows", "character":
    "symbol", "characters": "symbols", "size": "length", "time": "moment", "type": "kind", "types": "kinds",
    "module": "library", "modules": "libraries", "instance": "object", "key": "identifier", "keys": "identifiers",
    "dictionary": "mapping", "mapping": "dictionary", "sequence": "series", "item": "element", "items": "elements",
    "first": "initial", "last": "final", "current": "present", "specified": "stated", "optional": "not required",
    "required": "mandatory", "check": "verify", "checks": "verifies", "convert": "transform", "converts":
    "transforms", "contains": "holds", "contain": "hold", "each": "every", "all": "every one of", "only": "solely",
    "also": "additionally", "must": "has to", "should": "ought to", "may": "might", "can": "is able to",
    "result": "outcome", "results": "outcomes", "input": "source", "output": "sink", "buffer": "storage area",
    "socket": "network endpoint", "thread": "lightweight process", "process": "running program", "server":
    "host", "client": "caller", "message": "note", "messages": "notes", "header": "heading", "headers":
    "headings", "date": "day", "encoding": "charset", "bytes": "octets", "integer": "whole number", "float":
    "real number", "exception": "failure", "exceptions": "failures", "attribute": "property", "attributes":
    "properties", "option": "choice", "options": "choices", "format": "layout", "parse": "analyse", "parses":
    "analyses", "parser": "analyser", "version": "release", "index": "position", "copy": "duplicate",
    "open": "launch", "close": "shut", "closed": "shut", "run": "execute", "runs": "executes", "wait": "pause",
    "send": "transmit", "receive": "accept", "user": "person", "system": "platform", "tree": "hierarchy",
    "node": "vertex", "nodes": "vertices", "element": "member", "elements": "members", "table": "grid",
}


def paraphrase(sentence: str, doc_terms: set[str], terms: Callable[[str], list[str]]) -> str | None:
    """The sentence with its words swapped for synonyms; None unless the result keeps >= 3 indexed
    words and none of them occurs in the document."""
    words = [SYNONYMS.get(w.lower(), w) for w in re.findall(r"[A-Za-z]+", sentence)]
    kept = [w for w in words if not set(terms(w)) & doc_terms]
    if len(terms(" ".join(kept))) < 3 or sum(w in SYNONYMS.values() for w in kept) < 2:
        return None
    return " ".join(kept)


def invented_name(rng: random.Random) -> str:
    syll = "va ko ri tes lan mun dor qui zel bra ven tho sa mi ul gor ne fa".split()
    word = lambda n: "".join(rng.choice(syll) for _ in range(n)).capitalize()  # noqa: E731
    return f"{word(2)} {word(3)}"


def build(n_docs: int, per_kind: int, seed: int):
    """-> (documents {id: text}, queries [(kind, text, right id)])."""
    from memlm.index.lexical_index import terms

    rng = random.Random(seed)
    paras = [p for p in stdlib_paragraphs() if 80 <= len(p) <= 360]
    rng.shuffle(paras)
    docs = {f"d{i:05d}": p for i, p in enumerate(paras[:n_docs])}
    ids = list(docs)
    df: dict[str, int] = {}
    for text in docs.values():
        for t in set(terms(text)):
            df[t] = df.get(t, 0) + 1
    queries: list[tuple[str, str, str]] = []
    pool = ids[:]
    rng.shuffle(pool)
    used: set[str] = set()

    def take(pred: Callable[[str], object]) -> list[tuple[str, object]]:
        out = []
        for d in pool:
            if d in used:
                continue
            got = pred(d)
            if got:
                used.add(d)
                out.append((d, got))
                if len(out) == per_kind:
                    break
        return out

    names: set[str] = set()
    for d, _ in take(lambda d: True):
        name = invented_name(rng)
        while name in names:
            name = invented_name(rng)
        names.add(name)
        docs[d] = f"According to {name}, {docs[d][0].lower()}{docs[d][1:]}"
        queries.append(("entity", f"What did {name} say?", d))

    code_re = re.compile(r"\b(?:[a-z]+_[a-z_]+|[A-Z][A-Z0-9_]{3,})\b")

    def rare_code(d: str) -> str | None:
        for c in code_re.findall(docs[d]):
            if all(df.get(t, 0) == 1 for t in terms(c)) and terms(c):
                return c
        return None

    queries += [("code", f"What is {c}?", d) for d, c in take(rare_code)]

    def para_query(d: str) -> str | None:
        first = re.split(r"(?<=[.!?])\s", docs[d], maxsplit=1)[0]
        return paraphrase(first, set(terms(docs[d])), terms)

    queries += [("paraphrase", q, d) for d, q in take(para_query)]

    def split_first(d: str) -> tuple[str, str] | None:
        parts = re.split(r"(?<=[.!?])\s", docs[d], maxsplit=1)
        if len(parts) == 2 and len(terms(parts[0])) >= 4 and len(parts[1]) >= 60:
            return parts[0], parts[1]
        return None

    for d, (first, rest) in take(split_first):
        docs[d] = rest
        queries.append(("topical", first, d))
    return docs, queries


def variants():
    """name -> fuser(dense, lexical, k, cosine_of, bm25_of, reference) over one query's candidates
    ((scores, ids) best first, fusion_depth(k) from each ranking unless the name says @N),
    each calling memlm.index.fusion (the store's code)."""
    from memlm.index import fusion as F

    def rrf(c: int, lexical_weight: float = 1.0, depth: int | None = None):
        return depth, lambda d, lx, k, **_: F.reciprocal_rank_fusion([d[1], lx[1]], k, [1.0, lexical_weight], c)

    def absolute(dense_weight: float, floor: float, power: float = 1.0):
        return None, lambda d, lx, k, **kw: F.absolute_fusion(
            d, lx, k, dense_weight=dense_weight, lexical_floor=floor, lexical_power=power, **kw
        )

    return {
        "rrf, constant 60 (old default)": rrf(60),
        "rrf 60, depth 100": rrf(60, depth=100),
        "rrf 10": rrf(10),
        "rrf 1": rrf(1),
        "rrf 60, lexical weight 2": rrf(60, 2.0),
        "relative_score": (None, lambda d, lx, k, **_: F.relative_score_fusion([d, lx], k)),
        "relative_score, depth 100": (100, lambda d, lx, k, **_: F.relative_score_fusion([d, lx], k)),
        "dbsf": (None, lambda d, lx, k, **_: F.distribution_based_score_fusion([d, lx], k)),
        "absolute 0.5 dense, coverage": absolute(0.5, 0.0),
        "absolute 0.4 dense, coverage": absolute(0.4, 0.0),
        "absolute 0.5 dense, coverage^2": absolute(0.5, 0.0, 2.0),
        "absolute 0.4 dense, coverage^2": absolute(0.4, 0.0, 2.0),
        "absolute 0.4 dense, coverage^3": absolute(0.4, 0.0, 3.0),
        "absolute 0.5 dense, coverage > 0.2": absolute(0.5, 0.2),
        "absolute 0.5 dense, coverage > 0.3": absolute(0.5, 0.3),
        "absolute 0.4 dense, coverage > 0.3 (default)": absolute(0.4, 0.3),
        "absolute 0.4 dense, coverage > 0.4": absolute(0.4, 0.4),
        "absolute 0.3 dense, coverage > 0.3": absolute(0.3, 0.3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1500)
    ap.add_argument("--per-kind", type=int, default=40)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from memlm.config import StoreSettings
    from memlm.index.fusion import fusion_depth
    from memlm.index.memory_store import MemoryStore
    from memlm.index.types import Document

    docs, queries = build(args.docs, args.per_kind, args.seed)
    count = {kind: sum(q[0] == kind for q in queries) for kind in KINDS}
    print(f"{len(docs)} stdlib docstring paragraphs; queries per kind: {count}", flush=True)
    k = args.k
    with tempfile.TemporaryDirectory() as tmp:
        settings = StoreSettings(max_k=100_000)
        store = MemoryStore.open(Path(tmp), settings)
        store.create_collection("fusion")
        t0 = time.perf_counter()
        items = [Document(id=d, text=t) for d, t in docs.items()]
        for i in range(0, len(items), 256):
            store.ingest("fusion", items[i : i + 256])
        print(f"ingested in {time.perf_counter() - t0:.0f} s; searching ...", flush=True)
        texts = [q for _, q, _ in queries]
        n_chunks = store.describe("fusion").chunks
        ranked = {}  # every chunk by each ranking, best first (lexical: those sharing a word)
        for mode in ("dense", "lexical"):
            hits = []
            for i in range(0, len(texts), 32):
                hits += store.search_batch("fusion", queries=texts[i : i + 32], k=n_chunks, mode=mode)
            ranked[mode] = hits
        store_hybrid = store.search_batch("fusion", queries=texts, k=k, mode="hybrid")
        # What each fusion costs: one query at a time through the store, embedding included.
        from memlm.index.fusion import FUSION_METHODS

        ms: dict[str, float] = {}
        for method in ("dense only", *FUSION_METHODS):
            store.settings = settings.model_copy(update={"fusion": method} if method != "dense only" else {})
            mode = "dense" if method == "dense only" else "hybrid"
            t0 = time.perf_counter()
            for q in texts:
                store.search("fusion", q, k=k, mode=mode)
            ms[method] = (time.perf_counter() - t0) / len(texts) * 1e3
        store.settings = settings
        lexical_index = store._collections["fusion"].derived.lexical.index  # noqa: SLF001 - the benchmark's own store
        reference = [lexical_index.reference_score(q) for q in texts]
        store.close()

    # Per query, every chunk's cosine and BM25 (0: no word shared): what the store's cosine_of /
    # bm25_of return for candidates a ranking did not give.
    full = {m: [{h.chunk_id: h.score for h in row} for row in ranked[m]] for m in ranked}
    doc_of = {h.chunk_id: h.doc_id for m in ranked for row in ranked[m] for h in row}

    def candidates(m: str, q: int, depth: int):
        top = ranked[m][q][:depth]
        return np.array([h.score for h in top], np.float32), np.array([h.chunk_id for h in top], np.int64)

    rows: dict[str, list[list[str]]] = {  # mode -> per query, the doc ids of its top k
        "dense": [[h.doc_id for h in r[:k]] for r in ranked["dense"]],
        "lexical": [[h.doc_id for h in r[:k]] for r in ranked["lexical"]],
    }
    for name, (depth, fuser) in variants().items():
        d = depth or fusion_depth(k)
        rows[name] = []
        for q in range(len(queries)):
            _, ids = fuser(
                candidates("dense", q, d), candidates("lexical", q, d), k,
                cosine_of=lambda c, q=q: np.array([full["dense"][q][i] for i in c.tolist()]),
                bm25_of=lambda c, q=q: np.array([full["lexical"][q].get(i, 0.0) for i in c.tolist()]),
                bm25_reference=reference[q],
            )
            rows[name].append([doc_of[int(c)] for c in ids])
    rows[f"store hybrid (store.fusion={settings.fusion})"] = [[h.doc_id for h in r] for r in store_hybrid]

    header = "mode".ljust(46) + "".join(f"{kind:>14s}" for kind in KINDS) + f"{'all':>14s}"
    print(f"\ntop-1 / recall@{k} per query kind\n{header}")
    for name, tops in rows.items():
        cells = []
        for kind in (*KINDS, "all"):
            qs = [i for i, q in enumerate(queries) if kind in ("all", q[0])]
            top1 = np.mean([bool(tops[i]) and tops[i][0] == queries[i][2] for i in qs])
            rec = np.mean([queries[i][2] in tops[i][:k] for i in qs])
            cells.append(f"{top1:.2f} / {rec:.2f}")
        print(name.ljust(46) + "".join(f"{c:>14s}" for c in cells))
    print(f"\nsearch, one query at a time in-process (embedding included), k {k}, mean ms/query: "
          + ", ".join(f"{m} {v:.1f}" for m, v in ms.items()))


if __name__ == "__main__":
    main()
