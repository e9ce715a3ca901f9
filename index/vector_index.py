"""A FAISS vector index with stable int64 ids, inner-product metric, deletes, exact filtered
search, and atomic save/load. It is derived data: the store can always rebuild it from LMDB.

What it papers over, per kind of FAISS index:
- Indexes that need training (IVF, PQ): vectors added before there are enough to train on go to an
  exact staging index (IDMap2 over Flat); searches read both and merge. Once staging holds
  `39 * max(nlist, 2**nbits)` vectors (FAISS's own "please provide at least 39 points per
  centroid" threshold, for the coarse quantizer and for the PQ codebooks) the index is trained on
  them and they move over. Until then results are exact.
- Indexes that cannot remove ids (HNSW): removed ids become tombstones excluded at search time by
  an IDSelector; past `rebuild_fraction` tombstones the index is rebuilt from the live vectors.
- IVF indexes keep user ids in their inverted lists, so they are not wrapped in IndexIDMap2:
  IDMap's remove_ids renumbers inner ids as IndexFlat does, which IVF does not.
- Filtered search (`allowed_ids`): fewer than `exact_filter_below` allowed ids are scored by brute
  force over exactly those vectors; more go to FAISS with an IDSelectorBatch (or, for indexes whose
  search takes no selector, such as flat PQ, an over-fetch that doubles until k allowed hits).

Vectors for brute force and rebuilds come from `fetch(ids) -> (n, dim)`; the store passes an
LMDB reader. Without one the index keeps its own copy of every vector in memory.
Not thread-safe: the store serialises calls per collection.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional

import faiss
import numpy as np

from memlm.errors import InvalidArgument

VectorFetch = Callable[[np.ndarray], np.ndarray]  # (n,) int64 ids -> (n, dim) float32

_MAGIC = b"MEMLMVI1"
_FETCH_BATCH = 4096


class IndexFileError(Exception):
    """An index file that cannot be loaded (truncated, corrupted, wrong format)."""


def _make_faiss_index(dim: int, factory: str) -> faiss.Index:
    if not isinstance(factory, str) or not factory.strip():
        raise InvalidArgument(f"index factory must be a non-empty FAISS factory string, got {factory!r}")
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise InvalidArgument(
            f"invalid FAISS index factory {factory!r} for dim {dim} (e.g. 'Flat', 'HNSW32', 'IVF256,Flat', "
            f"'IVF256,PQ16', 'PQ16'): {first}"
        ) from None


def _no_polysemous_training(index: faiss.Index) -> None:
    """Turn off polysemous training, which index_factory switches on for every "PQ<m>" (IndexPQ,
    IndexIVFPQ): it reorders the PQ centroids for Hamming-distance filtering that the store never
    searches with, and costs ~55 s of annealing per training on one core (512 vectors of dim 384;
    the codebook k-means itself takes 0.05 s)."""
    part = faiss.downcast_index(index)
    while part is not None:
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
        inner = getattr(part, "index", None) or getattr(part, "base_index", None)  # IDMap, PreTransform, Refine
        part = faiss.downcast_index(inner) if inner is not None else None


def _ivf_of(index: faiss.Index) -> Optional[faiss.IndexIVF]:
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def _unwrap(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(index.index)
    return index


def _topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of (nq, m) scores; ids -1 mark holes. Returns (nq, k) padded with -inf / -1."""
    nq, m = scores.shape
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if m == 0:
        return out_s, out_i
    kk = min(k, m)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < m else np.tile(np.arange(m), (nq, 1))
    part_s = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_s, axis=1, kind="stable")
    sel = np.take_along_axis(part, order, axis=1)
    out_s[:, :kk] = np.take_along_axis(scores, sel, axis=1)
    out_i[:, :kk] = np.take_along_axis(ids if ids.ndim == 2 else np.broadcast_to(ids, scores.shape), sel, axis=1)
    out_i[~np.isfinite(out_s)] = -1
    return out_s, out_i


class VectorIndex:
    """FAISS index over unit vectors (inner product), addressed by int64 ids."""

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        fetch: Optional[VectorFetch] = None,
        *,
        exact_filter_below: int = 20_000,
        rebuild_fraction: float = 0.2,
        nprobe: Optional[int] = None,
        ef_search: int = 64,
        min_train: Optional[int] = None,
    ) -> None:
        """`min_train`: vectors staged before an index that needs training is trained; None =
        FAISS's 39 per centroid (see the module docstring). The factory check trains on fewer."""
        if not isinstance(dim, int) or dim <= 0:
            raise InvalidArgument(f"vector dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.factory = factory
        self.exact_filter_below = exact_filter_below
        self.rebuild_fraction = rebuild_fraction
        self.ef_search = ef_search
        self._fetch_external = fetch
        self._vectors: Optional[dict[int, np.ndarray]] = None if fetch is not None else {}
        self._live: set[int] = set()
        self._tombstones: set[int] = set()
        self._main = self._new_main()
        ivf = _ivf_of(self._main)
        self._nlist = ivf.nlist if ivf is not None else 0
        self.nprobe = nprobe if nprobe is not None else (min(self._nlist, max(8, self._nlist // 8)) if ivf else 0)
        self._staging: Optional[faiss.Index] = None if self._main.is_trained else self._new_staging()
        self._min_train = self._training_size() if min_train is None or self._main.is_trained else min_train
        self._supports_remove = True  # learnt on first failure (HNSW, NSG raise)
        self._supports_selector = True  # learnt on first failure (flat PQ raises)

    # ---------------------------------------------------------------- construction helpers

    def _new_main(self) -> faiss.Index:
        index = _make_faiss_index(self.dim, self.factory)
        _no_polysemous_training(index)
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) or _ivf_of(index) is not None:
            return index
        return faiss.IndexIDMap2(index)

    def _new_staging(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _training_size(self) -> int:
        if self._main.is_trained:
            return 0
        inner = _unwrap(self._main)
        centroids = self._nlist
        pq = getattr(inner, "pq", None)
        if pq is not None:
            centroids = max(centroids, 1 << pq.nbits)
        return 39 * max(centroids, 1)

    # ---------------------------------------------------------------- properties

    @property
    def ntotal(self) -> int:
        """Live vectors (tombstoned ones excluded)."""
        return len(self._live)

    @property
    def is_trained(self) -> bool:
        return self._staging is None

    @property
    def tombstones(self) -> int:
        return len(self._tombstones)

    def ids(self) -> np.ndarray:
        out = np.fromiter(self._live, dtype=np.int64, count=len(self._live))
        out.sort()
        return out

    def __contains__(self, chunk_id: int) -> bool:
        return int(chunk_id) in self._live

    # ---------------------------------------------------------------- vectors for brute force and rebuilds

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self._vectors is not None:
            if len(ids) == 0:
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.stack([self._vectors[int(i)] for i in ids])
        assert self._fetch_external is not None
        out = np.asarray(self._fetch_external(ids), dtype=np.float32)
        if out.shape != (len(ids), self.dim):
            raise RuntimeError(f"vector fetch returned shape {out.shape}, expected {(len(ids), self.dim)}")
        return out

    # ---------------------------------------------------------------- mutation

    def _check_vectors(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InvalidArgument(f"vectors must have shape (n, {self.dim}), got {vectors.shape}")
        if len(ids) != len(vectors):
            raise InvalidArgument(f"got {len(ids)} ids for {len(vectors)} vectors")
        return ids, vectors

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (n,) ids with (n, dim) vectors. Ids must be new (never added, or removed and rebuilt)."""
        ids, vectors = self._check_vectors(ids, vectors)
        if len(ids) == 0:
            return
        if len(np.unique(ids)) != len(ids):
            raise InvalidArgument("duplicate ids in one add() call")
        clash = [int(i) for i in ids if int(i) in self._live or int(i) in self._tombstones]
        if clash:
            raise InvalidArgument(f"ids already in the index: {clash[:10]}")
        if (ids < 0).any():
            raise InvalidArgument(f"ids must be non-negative, got {int(ids.min())}")
        if self._vectors is not None:
            for i, v in zip(ids.tolist(), vectors):
                self._vectors[i] = v.copy()
        self._add_vectors(ids, vectors)

    def _train_from_staging(self) -> None:
        staging = self._staging
        assert staging is not None
        n = staging.ntotal
        flat = faiss.downcast_index(staging.index)
        xb = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).copy().reshape(n, self.dim)  # (n, dim)
        ids = faiss.vector_to_array(staging.id_map).astype(np.int64)  # (n,)
        self._main.train(xb)
        self._main.add_with_ids(xb, ids)
        self._staging = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids; unknown ones are ignored. Returns how many were removed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        present = np.array([i for i in ids.tolist() if i in self._live], dtype=np.int64)
        if len(present) == 0:
            return 0
        self._live.difference_update(present.tolist())
        if self._vectors is not None:
            for i in present.tolist():
                self._vectors.pop(i, None)
        sel = faiss.IDSelectorBatch(present)
        if self._staging is not None:
            self._staging.remove_ids(sel)
            return len(present)  # nothing reaches main before training
        if self._supports_remove:
            try:
                self._main.remove_ids(sel)
                return len(present)
            except RuntimeError:
                self._supports_remove = False
        self._tombstones.update(present.tolist())
        if len(self._tombstones) > self.rebuild_fraction * (len(self._live) + len(self._tombstones)):
            self.rebuild()
        return len(present)

    def rebuild(self) -> None:
        """Rebuild the FAISS index from the live vectors (drops tombstones; retrains when needed)."""
        live = self.ids()
        self._main = self._new_main()
        self._staging = None if self._main.is_trained else self._new_staging()
        self._tombstones = set()
        self._live = set()
        for lo in range(0, len(live), _FETCH_BATCH):
            batch = live[lo : lo + _FETCH_BATCH]
            self._add_vectors(batch, self.fetch(batch))  # own vectors, if any, are kept as they are

    def _add_vectors(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self._staging is not None:
            self._staging.add_with_ids(vectors, ids)
            self._live.update(ids.tolist())
            if self._staging.ntotal >= self._min_train:
                self._train_from_staging()
        else:
            self._main.add_with_ids(vectors, ids)
            self._live.update(ids.tolist())

    # ---------------------------------------------------------------- search

    def _params(self, sel: Optional[faiss.IDSelector], k: int):
        inner = _unwrap(self._main)
        if self._nlist:
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe) if sel is not None else faiss.SearchParametersIVF(nprobe=self.nprobe)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, k)) if sel is not None else faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _search_main(self, queries: np.ndarray, k: int, allowed: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Approximate search of the trained index, restricted to `allowed` (sorted) when given and
        never returning tombstones."""
        nq = len(queries)
        n_main = self._main.ntotal
        if n_main == 0:
            return np.full((nq, 0), -np.inf, np.float32), np.full((nq, 0), -1, np.int64)
        if allowed is None and self._tombstones:
            tomb = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
            batch = faiss.IDSelectorBatch(tomb)
            sel: Optional[faiss.IDSelector] = faiss.IDSelectorNot(batch)
        elif allowed is not None:
            batch = faiss.IDSelectorBatch(allowed)
            sel = batch
        else:
            sel = None
        kk = min(k, n_main)
        if self._supports_selector or sel is None:
            try:
                params = self._params(sel, kk)
                scores, ids = self._main.search(queries, kk, params=params) if params is not None else self._main.search(queries, kk)
                return scores, ids
            except RuntimeError:
                if sel is None:
                    raise
                self._supports_selector = False
        # This index takes no selector: over-fetch and post-filter, doubling until k pass or all seen.
        fetch_k = kk
        while True:
            fetch_k = min(max(fetch_k * 4, 64), n_main)
            params = self._params(None, fetch_k)
            scores, ids = self._main.search(queries, fetch_k, params=params) if params is not None else self._main.search(queries, fetch_k)
            if allowed is not None:
                ok = np.isin(ids, allowed)
            else:
                ok = ~np.isin(ids, np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones)))
            ok &= ids >= 0
            if (ok.sum(axis=1) >= kk).all() or fetch_k >= n_main:
                return _topk(np.where(ok, scores, -np.inf), np.where(ok, ids, -1), kk)

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: Optional[np.ndarray] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(nq, dim) queries -> (nq, k) scores (float32, -inf for holes) and ids (int64, -1 for holes).

        `allowed_ids` restricts results to those ids; ids not in the index are ignored.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidArgument(f"queries must have shape (nq, {self.dim}), got {queries.shape}")
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidArgument(f"k must be a positive integer, got {k!r}")
        k = int(k)
        nq = len(queries)
        empty = (np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64))
        if not self._live:
            return empty

        allowed: Optional[np.ndarray] = None
        if allowed_ids is not None:
            allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64))
            if len(allowed) < self.exact_filter_below:
                # Exact: score just the allowed vectors. This is what makes small filters exact
                # whatever the index (an HNSW graph walk under a tight selector misses neighbours).
                live = np.array([i for i in allowed.tolist() if i in self._live], dtype=np.int64)
                if len(live) == 0:
                    return empty
                vecs = self.fetch(live)  # (n, dim)
                return _topk(queries @ vecs.T, live, k)
            if self._tombstones:
                allowed = np.setdiff1d(
                    allowed, np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones)), assume_unique=True
                )
            if len(allowed) == 0:
                return empty

        parts_s, parts_i = [], []
        if self._staging is not None:
            if self._staging.ntotal:
                ks = min(k, self._staging.ntotal)
                if allowed is not None:
                    sel_batch = faiss.IDSelectorBatch(allowed)
                    s, i = self._staging.search(queries, ks, params=faiss.SearchParameters(sel=sel_batch))
                else:
                    s, i = self._staging.search(queries, ks)
                parts_s.append(s)
                parts_i.append(i)
        else:
            s, i = self._search_main(queries, k, allowed)
            parts_s.append(s)
            parts_i.append(i)
        if not parts_s:
            return empty
        return _topk(np.concatenate(parts_s, axis=1), np.concatenate(parts_i, axis=1), k)

    # ---------------------------------------------------------------- persistence

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically: a temporary file, fsync, rename, fsync the folder.
        A crash leaves either the old file or the new one, never a torn one; a checksum catches
        what the disk mangles later."""
        path = Path(path)
        header = json.dumps(
            {
                "dim": self.dim,
                "factory": self.factory,
                "nprobe": self.nprobe,
                "ef_search": self.ef_search,
                "exact_filter_below": self.exact_filter_below,
                "rebuild_fraction": self.rebuild_fraction,
                "has_staging": self._staging is not None,
                "own_vectors": self._vectors is not None,
            }
        ).encode()
        sections = [
            faiss.serialize_index(self._main).tobytes(),
            faiss.serialize_index(self._staging).tobytes() if self._staging is not None else b"",
            self.ids().tobytes(),
            np.array(sorted(self._tombstones), dtype=np.int64).tobytes(),
        ]
        if self._vectors is not None:
            own_ids = self.ids()
            sections.append(own_ids.tobytes())
            sections.append(self.fetch(own_ids).astype(np.float32).tobytes() if len(own_ids) else b"")
        body = bytearray(_MAGIC)
        body += struct.pack("<I", len(header)) + header
        for s in sections:
            body += struct.pack("<Q", len(s)) + s
        body += struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)

        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: Path, fetch: Optional[VectorFetch] = None) -> "VectorIndex":
        """Load a file written by `save`. Raises IndexFileError if it is unreadable or corrupt."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise IndexFileError(f"cannot read index file {path}: {e}") from None
        if len(data) < len(_MAGIC) + 8 or data[: len(_MAGIC)] != _MAGIC:
            raise IndexFileError(f"{path} is not a memlm index file")
        (crc,) = struct.unpack("<I", data[-4:])
        if zlib.crc32(data[:-4]) & 0xFFFFFFFF != crc:
            raise IndexFileError(f"{path} fails its checksum (truncated or corrupted)")
        pos = len(_MAGIC)
        try:
            (hlen,) = struct.unpack_from("<I", data, pos)
            pos += 4
            header = json.loads(data[pos : pos + hlen])
            pos += hlen
            sections = []
            while pos < len(data) - 4:
                (n,) = struct.unpack_from("<Q", data, pos)
                pos += 8
                sections.append(data[pos : pos + n])
                pos += n
        except (struct.error, ValueError) as e:
            raise IndexFileError(f"{path} is malformed: {e}") from None

        own = header["own_vectors"]
        if own and fetch is not None:
            fetch = None  # the file carries its vectors; prefer them for consistency
        self = cls(
            header["dim"],
            header["factory"],
            fetch,
            exact_filter_below=header["exact_filter_below"],
            rebuild_fraction=header["rebuild_fraction"],
            nprobe=header["nprobe"] or None,
            ef_search=header["ef_search"],
        )
        if not own and fetch is None:
            raise IndexFileError(f"{path} holds no vectors; pass fetch= to load it")
        self._main = faiss.deserialize_index(np.frombuffer(sections[0], dtype=np.uint8).copy())
        self._staging = (
            faiss.deserialize_index(np.frombuffer(sections[1], dtype=np.uint8).copy()) if header["has_staging"] else None
        )
        self._live = set(np.frombuffer(sections[2], dtype=np.int64).tolist())
        self._tombstones = set(np.frombuffer(sections[3], dtype=np.int64).tolist())
        if own:
            vids = np.frombuffer(sections[4], dtype=np.int64)
            vecs = np.frombuffer(sections[5], dtype=np.float32).reshape(len(vids), self.dim) if len(vids) else []
            self._vectors = {int(i): np.array(v) for i, v in zip(vids, vecs)}
        return self
