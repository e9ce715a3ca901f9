"""Documents from files and folders, the way `memlm ingest` reads them.

A text or Markdown file is one document; a JSONL file holds one document per line (`id`, `text`,
`metadata`). A file's document id does not depend on how its path was typed: a folder argument
gives ids relative to that folder (`corpus/sub/a.txt` -> `sub/a.txt`), a file argument gives its
name (`corpus/a.txt`, `/abs/corpus/a.txt` and `a.txt` are all `a.txt`), and `id_prefix` is put
in front (`--id-prefix corpus/`). JSONL lines keep the ids they carry. In folders only the
suffixes below are read unless globs are given; a file named as an argument is always read.
Everything here runs before anything is sent, so a bad argument stores nothing.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
READ_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES


@dataclass(frozen=True)
class SourceFile:
    path: Path
    doc_id: str  # the id of a text file's one document; JSONL lines carry their own

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix.lower() in JSONL_SUFFIXES


@dataclass
class FileSelection:
    files: list[SourceFile] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # named paths that do not exist
    duplicate_ids: dict[str, list[Path]] = field(default_factory=dict)  # id -> the files that share it
    not_read: dict[Path, Counter] = field(default_factory=dict)  # folder -> suffix counts left out
    empty_folders: list[Path] = field(default_factory=list)  # folders that gave no file


def _visible(path: Path, root: Path) -> bool:
    return path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder_files(root: Path, globs: Sequence[str], not_read: Counter) -> list[Path]:
    if globs:
        # A pattern without a slash matches a name at any depth, like .gitignore.
        found = {p for g in globs for p in (root.rglob(g) if "/" not in g else root.glob(g)) if _visible(p, root)}
        return sorted(found)
    files = []
    for p in sorted(root.rglob("*")):
        if not _visible(p, root):
            continue
        if p.suffix.lower() in READ_SUFFIXES:
            files.append(p)
        else:
            not_read[p.suffix.lower() or "no suffix"] += 1
    return files


def select_files(paths: Sequence[Path], *, globs: Sequence[str] = (), id_prefix: str = "") -> FileSelection:
    """The files `paths` name, each once, with its document id; what is missing or clashes is
    recorded, not raised, so the caller can report all of it at once."""
    sel = FileSelection()
    seen: dict[Path, SourceFile] = {}
    by_id: dict[str, list[Path]] = {}
    for path in paths:
        if path.is_dir():
            not_read: Counter = Counter()
            found = _folder_files(path, globs, not_read)
            if not_read:
                sel.not_read[path] = not_read
            if not found:
                sel.empty_folders.append(path)
            pairs = [(p, p.relative_to(path).as_posix()) for p in found]
        elif path.is_file():
            pairs = [(path, path.name)]
        else:
            sel.missing.append(path)
            continue
        for p, rel in pairs:
            key = p.resolve()
            if key in seen:  # named twice (a file and its folder, say): read once
                continue
            source = SourceFile(p, id_prefix + rel)
            seen[key] = source
            sel.files.append(source)
            if not source.is_jsonl:
                by_id.setdefault(source.doc_id, []).append(p)
    sel.duplicate_ids = {i: ps for i, ps in by_id.items() if len(ps) > 1}
    return sel


def count_documents(files: Sequence[SourceFile]) -> int:
    """How many documents `read_documents` will offer (JSONL: non-blank lines), for a progress total."""
    total = 0
    for f in files:
        if not f.is_jsonl:
            total += 1
            continue
        try:
            with f.path.open("rb") as fh:
                total += sum(1 for line in fh if line.strip())
        except OSError:
            total += 1  # read_documents reports it as one skipped file
    return total


def read_documents(files: Sequence[SourceFile], skip: Callable[[str, str], None]) -> Iterator[dict]:
    """`{id, text, metadata}` per document. An unreadable file or a bad JSONL line is passed to
    `skip(where, why)` and left out."""
    for f in files:
        where = f.path.as_posix()
        try:
            raw = f.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            skip(where, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        except OSError as exc:
            skip(where, exc.strerror or str(exc))
            continue
        source = f.path.resolve().as_posix()
        if not f.is_jsonl:
            kind = "markdown" if f.path.suffix.lower() in {".md", ".markdown"} else "text"
            yield {"id": f.doc_id, "text": raw, "metadata": {"source": source, "format": kind}}
            continue
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("text"), str):
                    raise ValueError("expected an object with `id` and string `text`")
            except ValueError as exc:
                skip(f"{where}:{lineno}", str(exc))
                continue
            yield {"id": str(obj["id"]), "text": obj["text"], "metadata": obj.get("metadata") or {}}
