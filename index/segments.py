"""Rows of a derived memory on disk, in immutable segments committed by one manifest: the files and
the bookkeeping that `memlm.index.kv_memory.KVMemory` (knn's and landmark's keys and values) and
`memlm.modes.retro.memory.NeighbourStateMemory` (RETRO's neighbour states) share.

Layout of a memory's folder:
    manifest.json     the commit point: the subclass's shape facts, the live segments, the
                      tombstoned chunk ids, the next segment's number, the watermark (applied_seq)
    seg-000001/       one immutable segment per `add`: one .npy file per row array, chunk_ids.npy
                      ((n,) int64: the chunk each row belongs to) among them

Durability: a segment is written under a temporary folder (each file flushed and fsynced), renamed
into place, and only becomes part of the memory when manifest.json, written tmp + fsync +
os.replace + fsync of the folder, lists it. A crash leaves either the old manifest (the new
segment is garbage, removed on open) or the new one. Deleting chunks writes their ids into the
manifest (tombstones); `compact()` rewrites the live rows into one segment. The store (LMDB) stays
the source of truth: a memory can be rebuilt from its token ids at any time.

Limits: `chunk_ids()` concatenates every segment's ids into RAM (8 bytes a row), and `compact()`
every live row of every file (what a memory holds, once more, while it writes).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

import numpy as np
import torch

MANIFEST = "manifest.json"
DTYPES = ("float16", "bfloat16")  # on-disk dtypes of tensors (bf16 stored as its uint16 bits)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy_durably(path: Path, array: np.ndarray) -> None:
    """np.save, then flush + fsync the file (the caller fsyncs the folder / renames)."""
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: Path, data: dict, name: str = MANIFEST) -> None:
    """folder/name (manifest.json), durably: tmp + fsync + os.replace + fsync(folder) (old or new,
    never torn)."""
    tmp = folder / f".{name}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)
    fsync_dir(folder)


def write_segment(folder: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """folder/name/ holding one .npy file per array, durably, under a temporary name until every
    file is written and fsynced; the caller's manifest makes it part of the memory."""
    tmp = folder / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file, array in arrays.items():
        save_npy_durably(tmp / f"{file}.npy", array)
    fsync_dir(tmp)
    os.replace(tmp, folder / name)
    fsync_dir(folder)


def open_committed(folder: Path, what: str) -> dict:
    """The manifest of the memory at folder (FileNotFoundError naming `what` when there is none),
    after removing the segments it does not list (a crash mid-write)."""
    try:
        raw = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {folder} (expected {folder / MANIFEST})") from None
    remove_uncommitted(folder, raw.get("segments", []))
    return raw


def remove_uncommitted(folder: Path, live: Iterable[str]) -> None:
    """Segments a manifest does not list never committed (a crash mid-write): remove them."""
    live = set(live)
    for p in folder.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-") or (p.name.startswith("seg-") and p.name not in live)):
            shutil.rmtree(p, ignore_errors=True)


def to_disk(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()  # numpy has no bf16


def from_disk(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # a copy: memmaps are read-only
    return t if dtype == "float16" else t.view(torch.bfloat16)


class SegmentedRows:
    """The segment bookkeeping of one derived memory: which rows are live (tombstones), every chunk
    id it has seen, the watermark, deletes and compaction. A subclass says what its rows are:

    - `what`: the memory in messages ("KV memory");
    - `manifest_type`: its manifest dataclass: its own shape facts and the fields `segments`,
      `deleted_chunks`, `next_segment` and `applied_seq`, as written to manifest.json by `asdict`;
    - `row_files()`: each .npy file of a segment that holds rows (chunk_ids among them) and the
      axis it holds them along: what compaction carries over;
    - optionally `derived_files`, files computed from the rows and written with every segment, and
      `_live_rows_changed`, to drop what it keeps in RAM about the rows after a delete or compaction.
    """

    what: ClassVar[str] = "segmented memory"
    manifest_type: ClassVar[type]

    def __init__(self, path: Path, manifest: Any):
        self.path = Path(path)
        self.manifest = manifest
        self._deleted = set(manifest.deleted_chunks)
        self._known: Optional[set[int]] = None  # every chunk id ever added (live or tombstoned), read once

    @classmethod
    def _create(cls, path: "str | os.PathLike", manifest: Any) -> "SegmentedRows":
        """An empty memory at path with this manifest, committed (FileExistsError where one is)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise FileExistsError(f"{path} already holds {cls.what} ({MANIFEST} exists)")
        path.mkdir(parents=True, exist_ok=True)
        mem = cls(path, manifest)
        mem._write_manifest()
        return mem

    @classmethod
    def open(cls, path: "str | os.PathLike") -> "SegmentedRows":
        path = Path(path)
        return cls(path, cls.manifest_type(**open_committed(path, cls.what)))

    def row_files(self) -> dict[str, int]:
        """{file stem: the axis along which it holds rows} of every segment's row arrays."""
        raise NotImplementedError

    def derived_files(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Files computed from one segment's row arrays, written with it (none by default)."""
        return {}

    def _live_rows_changed(self) -> None:
        """After a delete or a compaction: which rows are live, or where they are, has changed."""

    # --- reading --------------------------------------------------------------------------

    def _segment_file(self, segment: str, file: str) -> np.ndarray:
        """One .npy file of a segment, memory-mapped (read-only)."""
        return np.load(self.path / segment / f"{file}.npy", mmap_mode="r")

    def _check_live(self, segment: str) -> None:
        if segment not in self.manifest.segments:
            raise KeyError(f"segment {segment!r} is not live in this {self.what} (live: {self.manifest.segments})")

    def segment_chunk_ids(self, segment: str) -> np.ndarray:
        """(n,) int64: the chunk of EVERY row of one segment, tombstoned rows included."""
        return np.asarray(self._segment_file(segment, "chunk_ids"))

    def live_mask(self, chunk_ids: np.ndarray) -> np.ndarray:
        """(n,) bool: which of these rows' chunks are not tombstoned."""
        if not self._deleted:
            return np.ones(len(chunk_ids), dtype=bool)
        return ~np.isin(chunk_ids, np.fromiter(self._deleted, dtype=np.int64))

    def __len__(self) -> int:
        """Live rows across segments."""
        return int(sum(self.live_mask(self.segment_chunk_ids(s)).sum() for s in self.manifest.segments))

    def chunk_ids(self) -> np.ndarray:
        """(N,) int64: the chunk of every live row, segment by segment."""
        parts = [c[self.live_mask(c)] for c in map(self.segment_chunk_ids, self.manifest.segments)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def known_chunks(self) -> set[int]:
        """Every chunk id this memory has rows for or has tombstoned: read from the segments once per
        open, then kept up to date (chunk ids are never reused, so an id in here is never built again)."""
        if self._known is None:
            self._known = set(self._deleted)
            for seg in self.manifest.segments:
                self._known.update(np.unique(self.segment_chunk_ids(seg)).tolist())
        return self._known

    # --- writing --------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        """The commit point: durable as `write_manifest` (old or new, never torn)."""
        self.manifest.deleted_chunks = sorted(self._deleted)
        write_manifest(self.path, asdict(self.manifest))

    def _append_segment(self, arrays: dict[str, np.ndarray]) -> str:
        """Write one segment of rows (every file of `row_files()`, with n > 0 rows) and its derived
        files, and commit it: durable when this returns. Returns its name."""
        m = self.manifest
        name = f"seg-{m.next_segment:06d}"
        write_segment(self.path, name, {**arrays, **self.derived_files(arrays)})
        m.segments.append(name)
        m.next_segment += 1
        self._write_manifest()  # the commit point
        if self._known is not None:
            self._known.update(np.asarray(arrays["chunk_ids"]).tolist())
        return name

    def set_applied_seq(self, seq: int) -> None:
        """Record the watermark (durable when this returns)."""
        if self.manifest.applied_seq != seq:
            self.manifest.applied_seq = int(seq)
            self._write_manifest()

    def delete(self, chunk_ids: Iterable[int]) -> int:
        """Tombstone the rows of these chunks (durable when this returns). Returns rows removed."""
        new = {int(c) for c in chunk_ids} - self._deleted
        if not new:
            return 0
        removed = int(np.isin(self.chunk_ids(), np.fromiter(new, dtype=np.int64)).sum())
        self._deleted |= new
        self._write_manifest()
        self._live_rows_changed()
        return removed

    def compact(self) -> None:
        """Rewrite all live rows as one segment and forget the tombstones. The files are copied as
        they are stored (no dtype round trip): a compacted segment holds the same bytes per row."""
        m = self.manifest
        old = list(m.segments)
        if not old and not self._deleted:
            return
        files = self.row_files()
        parts: dict[str, list[np.ndarray]] = {f: [] for f in files}
        for seg in old:
            live = self.live_mask(self.segment_chunk_ids(seg))
            for f, axis in files.items():
                parts[f].append(np.compress(live, self._segment_file(seg, f), axis=axis))
        rows = sum(len(c) for c in parts["chunk_ids"])
        m.segments = []
        self._deleted = set()
        if rows:
            self._append_segment({f: np.concatenate(p, axis=files[f]) for f, p in parts.items()})  # the commit point
        else:
            self._write_manifest()
        self._live_rows_changed()
        for seg in old:
            shutil.rmtree(self.path / seg, ignore_errors=True)
