"""The training corpus: real English text already on these machines, tokenised once and cached.

Sources (`SOURCES`), each a deterministic stream of `Document`s:
- "stdlib": the docstrings of this Python's standard library, one document per .py file (the
  extraction `benchmarks/corpus.py` also uses; PSF licence).
- "man": the English man pages under /usr/share/man/man[1-8], rendered to text by a crude roff
  reader (`roff_to_text`: man and mdoc macros, font escapes and conditionals dropped); `.so`
  aliases, symlinks, exact duplicates and gcloud's generated command pages skipped. Licences: each page's Debian package's
  /usr/share/doc/PKG/copyright.
- "doc": prose files under /usr/share/doc (.txt, .md, .rst, extension-less, and their .gz): no
  changelogs, NEWS, release notes, copyright or author lists, no code, no HTML.

`build_corpus` tokenises the documents with the model's tokenizer (tokenizers, no transformers)
and splits them into train and held-out BY DOCUMENT, whole groups at a time (a Debian package, a
top-level stdlib module: sha1 of the group name, so stable when documents are added; near-copies
of a page mostly live in one package). Every held-out document that shares any token 13-gram with
the train split is then dropped (it is in neither split), so the eval loss measures text the
model was not trained on. Removing the overlapping train documents instead was measured and
rejected: with 2% of documents held out, 2049 train documents (56% of the train tokens) share a
13-gram with them, mostly licence and option boilerplate. Moving overlapping held-out documents
into train cascades (each moved page brings its package's boilerplate) and was rejected too. The result is cached under `<cache>/corpus/<key>/` (key: sources, limits, the
tokenizer's hash, the Python version, CORPUS_VERSION) in two stages: the tokenised documents
(slow, once), and under them each split (seconds); each written to a temporary folder and renamed
into place. `corpus_documents` yields the same documents as (doc_id, text, metadata)
for ingesting into a collection. Needs numpy and tokenizers only (no torch, faiss or lmdb).
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

CORPUS_VERSION = 2
SOURCES = ("stdlib", "man", "doc")
SEPARATOR_TOKEN = 0  # SmolLM2's <|endoftext|>: ends every document in the token stream
NGRAM = 13  # overlap between splits is judged on token 13-grams (GPT-3's decontamination n)

# --- stdlib docstrings (shared with benchmarks/corpus.py) -----------------------------------------

# Packages whose docstrings are mostly test scaffolding, generated tables or vendored code.
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
               "turtledemo", "idlelib", "ensurepip", "pydoc_data"}


def stdlib_source_files() -> list[str]:
    """The standard library's .py files, sorted by path, without the packages in STDLIB_SKIP."""
    root = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in STDLIB_SKIP)
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def docstring_paragraphs(path: str) -> list[str]:
    """The docstring paragraphs of one .py file, whitespace collapsed, in `ast.walk` order (module,
    classes, functions); [] for a file that does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a few files are deliberately broken or not UTF-8
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for para in (ast.get_docstring(node) or "").split("\n\n"):
                para = " ".join(para.split())
                if para:
                    out.append(para)
    return out


# --- documents ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    doc_id: str  # "<source>:<path relative to the source root>"
    text: str
    source: str  # one of SOURCES
    package: str  # the Debian package that ships the file ("python" for stdlib)
    licence: str  # short licence names, "; "-joined (from the package's copyright file)

    def metadata(self) -> dict[str, str]:
        return {"source": self.source, "package": self.package, "licence": self.licence}


def _stdlib_documents(min_chars: int = 40) -> Iterator[Document]:
    root = sysconfig.get_paths()["stdlib"]
    licence = f"PSF-2.0 (Python {sys.version_info.major}.{sys.version_info.minor})"
    for path in stdlib_source_files():
        paras = [p for p in docstring_paragraphs(path) if len(p) >= min_chars and ">>>" not in p]
        if paras:
            yield Document(f"stdlib:{os.path.relpath(path, root)}", "\n\n".join(paras), "stdlib", "python", licence)


class _Packages:
    """Which Debian package owns a path (from /var/lib/dpkg/info/*.list) and the licences its
    copyright file names (DEP-5 `License:` fields; "unstructured" for free-form files)."""

    def __init__(self, info_dir: str = "/var/lib/dpkg/info", doc_root: str = "/usr/share/doc"):
        self.doc_root = doc_root
        self.owner: dict[str, str] = {}
        for lst in sorted(Path(info_dir).glob("*.list")) if Path(info_dir).is_dir() else []:
            pkg = lst.stem.split(":")[0]
            for line in lst.read_text(errors="replace").splitlines():
                self.owner.setdefault(line, pkg)
        self._licences: dict[str, str] = {}

    def package_of(self, path: str) -> str:
        return self.owner.get(path, "unknown")

    def licence_of(self, pkg: str) -> str:
        if pkg not in self._licences:
            self._licences[pkg] = _copyright_licences(Path(self.doc_root) / pkg / "copyright")
        return self._licences[pkg]


def _copyright_licences(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "unknown (no copyright file)"
    if not text.lstrip().startswith("Format:"):  # not machine-readable (DEP-5)
        return "unstructured (see copyright file)"
    names = []
    for m in re.finditer(r"^License:[ \t]*(\S[^\n]*)", text, re.M):
        name = m.group(1).strip()
        if name and name not in names:
            names.append(name)
    return "; ".join(names[:6]) if names else "unstructured (see copyright file)"


# roff: escapes mapped to text, then every other escape dropped.
_ROFF_CHARS = {"em": "\u2014", "en": "\u2013", "bu": "\u2022", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
               "oq": "'", "cq": "'", "co": "(c)", "rg": "(R)", "tm": "(TM)", "mu": "x", "->": "->",
               "<-": "<-", "hy": "-", "ti": "~", "ha": "^", "rs": "\\", "dg": "+", "de": " degrees", "pl": "+",
               "mi": "-", "eq": "=", "<=": "<=", ">=": ">=", "!=": "!=", "lh": "", "rh": "", "ga": "`"}
_ROFF_STRINGS = {"lq": '"', "rq": '"', "R": "(R)", "Tm": "(TM)", "Aq": "'", "C+": "C++", "PI": "pi", "L\"": '"',
                 "R\"": '"', "C`": '"', "C'": '"'}
_ROFF_ESCAPE = re.compile(
    r"\\(?:"
    r"\((?P<c2>..)|\[(?P<cb>[^\]]*)\]"  # \(xx, \[name]: special characters
    r"|\*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.))"  # \*x, \*(xx, \*[name]: strings
    r"|f(?:\(..|\[[^\]]*\]|.)"  # font changes
    r"|s[-+]?(?:\d+|\(\d\d|\[\d+\])"  # size changes
    r"|[nkgmMFY](?:\(..|\[[^\]]*\]|.)"  # registers, colours, fonts, marks
    r"|[hvwlLxbDNoXZR]'[^']*'"  # motions, widths, drawing, overstrikes
    r"|(?P<lit>[-e\\.'`\" ~0|^&c%:!{}acdprtu])"  # single-character escapes
    r")"
)
_MDOC_SKIP_WORDS = {"Ns", "No", "Pf", "Ql", "Li", "Em", "Sy", "Ar", "Cm", "Pa", "Ev", "Va", "Dv", "Er", "Ic", "Ad",
                    "Nm", "Op", "Oo", "Oc", "Dq", "Sq", "Pq", "Bq", "Brq", "Aq", "Qq", "Xr", "Fn", "Fa", "Ft", "Fo",
                    "Fc", "Vt", "Tn", "Ux", "Bx", "At", "Nx", "Fx", "Ox", "Dl", "It", "Xo", "Xc", "Sx", "Lk", "Mt",
                    "Do", "Dc", "So", "Sc", "Po", "Pc", "Qo", "Qc", "Bo", "Bc", "Eo", "Ec", "Lb", "Cd", "In", "Ms"}
_BLOCK_MACROS = {"PP", "LP", "P", "TP", "IP", "HP", "sp", "br", "SH", "SS", "Sh", "Ss", "Pp", "Lp", "Bl", "El",
                 "Bd", "Ed", "It", "Nd", "TQ", "RS", "RE", "in", "ti"}


def _roff_inline(text: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group("c2") or m.group("cb") is not None:
            return _ROFF_CHARS.get(m.group("c2") or m.group("cb"), "")
        s = m.group("s2") or m.group("sb") or m.group("s1")
        if s is not None:
            return _ROFF_STRINGS.get(s, "")
        lit = m.group("lit")
        if lit is None:
            return ""
        return {"-": "-", "e": "\\", "\\": "\\", ".": ".", "'": "'", "`": "`", " ": " ", "~": " ", "0": " "}.get(lit, "")

    text = re.sub(r'\\".*$', "", text)  # comment to end of line
    return _ROFF_ESCAPE.sub(repl, text)


def _macro_args(rest: str) -> list[str]:
    return [a[1:-1] if len(a) > 1 and a[0] == a[-1] == '"' else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_to_text(source: str) -> str:
    """Man-page roff (man or mdoc macros) as plain paragraphs, crudely: text lines joined into
    paragraphs, headings on their own lines, font/size escapes and unknown requests dropped,
    macro definitions and conditionals skipped, `.nf` blocks kept line by line. Not a renderer:
    tables (tbl) come out as their raw cells."""
    paras: list[str] = []
    current: list[str] = []
    no_fill = False

    def flush() -> None:
        if current:
            para = ("\n" if no_fill else " ").join(current).strip()
            if para:
                paras.append(para if no_fill else " ".join(para.split()))
            current.clear()

    lines = source.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):  # continuation
            line = line[:-1] + lines[i]
            i += 1
        if line.startswith((".\\\"", "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.'][ \t]*([^ \t]*)[ \t]*(.*)", line)
            name, rest = (m.group(1), m.group(2)) if m else ("", "")
            if name in ("de", "de1", "am", "ig"):  # definition / ignore block up to ".."
                while i < len(lines) and not lines[i].startswith(".."):
                    i += 1
                i += 1
                continue
            if name in ("nf", "EX", "Bd"):
                flush()
                no_fill = name != "Bd" or "-literal" in rest or "-unfilled" in rest
                continue
            if name in ("fi", "EE", "Ed"):
                flush()
                no_fill = False
                continue
            if name in ("SH", "SS", "Sh", "Ss"):
                flush()
                heading = " ".join(_macro_args(_roff_inline(rest)))
                if heading:
                    paras.append(heading.upper() if name in ("SH", "Sh") else heading)
                continue
            if name in _BLOCK_MACROS:
                flush()
                if name in ("IP", "It") and rest:  # the item's tag is text
                    words = [w for w in _macro_args(_roff_inline(rest)) if w not in _MDOC_SKIP_WORDS]
                    tag = " ".join(words[:1] if name == "IP" else words)
                    if tag and not re.fullmatch(r"[\d.]+", tag):
                        current.append(tag)
                continue
            if name in ("B", "I", "SM", "SB", "BR", "RB", "IR", "RI", "BI", "IB", "UR", "MT"):
                sep = "" if len(name) == 2 and name not in ("SM", "SB", "UR", "MT") else " "
                text = sep.join(_macro_args(_roff_inline(rest)))
                if text:
                    current.append(text)
                continue
            if re.fullmatch(r"[A-Z][a-z][a-z]?", name):  # mdoc: keep the arguments, drop macro names
                words, out = _macro_args(_roff_inline(rest)), []
                flag = name == "Fl"
                for w in words:
                    if w == "Fl":
                        flag = True
                        continue
                    if w in _MDOC_SKIP_WORDS:
                        continue
                    out.append("-" + w if flag else w)
                    flag = False
                if name == "Fl" and not words:
                    out = ["-"]
                if out and name not in ("Dd", "Dt", "Os"):
                    current.append(" ".join(out))
                continue
            continue  # any other request (.TH, .if, .ds, .nr, .ft, .ne, .ta, ...)
        text = _roff_inline(line)
        if not text.strip():
            flush()
            continue
        current.append(text.rstrip() if no_fill else text.strip())
    flush()
    return "\n\n".join(paras)


def _read_maybe_gz(path: str) -> Optional[str]:
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


# gcloud's 16.6k generated command pages (85% of the pages here) are one template filled in.
_MAN_SKIP_PREFIXES = ("gcloud",)


def _man_documents(root: str, packages: _Packages, min_chars: int = 200) -> Iterator[Document]:
    seen: set[bytes] = set()
    for section in sorted(Path(root).glob("man[1-8]")):
        for path in sorted(section.iterdir()):
            if path.is_symlink() or not path.is_file() or path.name.startswith(_MAN_SKIP_PREFIXES):
                continue
            src = _read_maybe_gz(str(path))
            if src is None or src.lstrip().startswith(".so "):
                continue  # unreadable, or an alias of another page
            text = roff_to_text(src)
            digest = hashlib.sha1(text.encode()).digest()
            if len(text) < min_chars or digest in seen:
                continue
            seen.add(digest)
            pkg = packages.package_of(str(path))
            yield Document(f"man:{path.relative_to(root)}", text, "man", pkg, packages.licence_of(pkg))


_DOC_SKIP_NAME = re.compile(r"changelog|^news|history|^changes|relnotes|release.?notes|copyright|^authors|^thanks|"
                            r"^contributors|buildinfo|build_signature|^todo|^bugs|^credits|^maintainers|requirements|"
                            r"test|status|summary|licen[cs]e|^copying",
                            re.I)
_DOC_SKIP_DIR = {"RelNotes", "examples", "html", "contrib", "spec-examples"}
_DOC_EXT = {"", ".txt", ".md", ".rst", ".text", ".debian", ".Debian", ".source"}


def _doc_documents(root: str, packages: _Packages, min_chars: int = 300) -> Iterator[Document]:
    seen: set[bytes] = set()
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _DOC_SKIP_DIR)
        for name in sorted(names):
            path = os.path.join(folder, name)
            base = name[:-3] if name.endswith(".gz") else name
            if os.path.islink(path) or _DOC_SKIP_NAME.search(base) or os.path.splitext(base)[1] not in _DOC_EXT:
                continue
            text = _read_maybe_gz(path)
            if text is None or len(text) < min_chars:
                continue
            body = re.sub(r"\s+", "", text)
            letters = sum(c.isalpha() for c in body)
            # Prose: mostly letters, few braces/semicolons (code, configs, tables fail this).
            if letters < 0.7 * len(body) or (body.count(";") + body.count("{")) > 0.01 * len(body):
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            rel = os.path.relpath(path, root)
            pkg = packages.package_of(path)
            pkg = rel.split(os.sep)[0] if pkg == "unknown" else pkg
            yield Document(f"doc:{rel}", text.strip(), "doc", pkg, packages.licence_of(pkg))


def split_group(doc: Document) -> str:
    """What is held out together: a stdlib top-level module or package, else a Debian package."""
    if doc.source == "stdlib":
        return "stdlib:" + doc.doc_id.split(":", 1)[1].split("/")[0].removesuffix(".py")
    return f"package:{doc.package}"


def corpus_documents(sources: Sequence[str] = SOURCES, max_docs: Optional[int] = None,
                     man_root: str = "/usr/share/man", doc_root: str = "/usr/share/doc") -> Iterator[Document]:
    """The corpus's documents, source by source in `sources` order, each source in a fixed file
    order; at most `max_docs` per source. Deterministic for a given machine's files."""
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ValueError(f"unknown corpus source(s) {', '.join(bad)}: expected some of {', '.join(SOURCES)}")
    packages = _Packages(doc_root=doc_root) if {"man", "doc"} & set(sources) else None
    for source in sources:
        stream = (_stdlib_documents() if source == "stdlib" else _man_documents(man_root, packages)
                  if source == "man" else _doc_documents(doc_root, packages))
        for n, doc in enumerate(stream):
            if max_docs is not None and n >= max_docs:
                break
            yield doc


def export_documents(out_dir: str | Path, sources: Sequence[str] = SOURCES, max_docs: Optional[int] = None) -> int:
    """Write each document as OUT/<source>/<id>.txt plus OUT/documents.jsonl (id, file,
    metadata); returns the number written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out / "documents.jsonl", "w") as index:
        for doc in corpus_documents(sources, max_docs):
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", doc.doc_id.split(":", 1)[1]) + ".txt"
            rel = Path(doc.source) / name
            (out / doc.source).mkdir(exist_ok=True)
            (out / rel).write_text(doc.text + "\n")
            index.write(json.dumps({"id": doc.doc_id, "file": str(rel), **doc.metadata()}) + "\n")
            n += 1
    return n


# --- tokenised, split, cached --------------------------------------------------------------------


@dataclass
class TokenSplit:
    """One split as a token stream: every document's tokens followed by SEPARATOR_TOKEN."""

    tokens: np.ndarray  # (N,) uint16 (SmolLM2's vocabulary is 49152 < 2**16)
    doc_starts: np.ndarray  # (D + 1,) int64 offsets into tokens; doc d is tokens[starts[d]:starts[d+1]]

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts) - 1


@dataclass
class Corpus:
    folder: Path  # the cache folder it was read from
    train: TokenSplit
    heldout: TokenSplit
    stats: dict = field(default_factory=dict)  # what stats.json holds (sources, tokens, licences, drops)


def ngram_hashes(tokens: np.ndarray, doc_starts: np.ndarray, n: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """64-bit polynomial hashes of every token n-gram that lies inside one document, and the
    document index of each. tokens (N,), doc_starts (D + 1,) -> (hashes (M,), docs (M,))."""
    t = tokens.astype(np.uint64)
    m = len(t) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    h = np.zeros(m, np.uint64)
    prime = np.uint64(1099511628211)  # FNV's 64-bit prime; multiplication wraps mod 2**64
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * prime + t[j : j + m] + np.uint64(1)
    doc_of = np.searchsorted(doc_starts, np.arange(m), side="right") - 1
    inside = np.arange(m) + n <= doc_starts[doc_of + 1]
    return h[inside], doc_of[inside]


def _tokenizer_path(model_dir: Path) -> Path:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the corpus is tokenised with the model's tokenizer.json)")
    return path


def corpus_cache_dir(cache_dir: Optional[Path] = None) -> Path:
    from memlm.models.loading import default_cache_dir

    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "corpus"


def _write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Build a cache folder under a temporary name and rename it into place (a crash leaves only a
    .build-* folder behind; the marker file each writer writes last says the folder is whole)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    try:
        write(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stream(parts: Sequence[np.ndarray]) -> TokenSplit:
    """Token arrays of documents -> one stream, each document followed by SEPARATOR_TOKEN."""
    lengths = np.array([len(p) + 1 for p in parts], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.full(int(starts[-1]), SEPARATOR_TOKEN, np.uint16)
    for p, s in zip(parts, starts[:-1]):
        tokens[s : s + len(p)] = p
    return TokenSplit(tokens, starts)


def tokenised_documents(model_dir: Path, sources: Sequence[str] = SOURCES, max_docs: Optional[int] = None,
                        cache_dir: Optional[Path] = None, log=print) -> tuple[Path, TokenSplit, list[dict]]:
    """Every document of the sources tokenised (the slow part: ~80 s for the whole corpus on an
    idle machine), cached: (its folder, the stream of all documents, one record per document)."""
    tok_path = _tokenizer_path(model_dir)
    key = json.dumps([CORPUS_VERSION, list(sources), max_docs, hashlib.sha1(tok_path.read_bytes()).hexdigest(),
                      sys.version_info[:2]])
    folder = corpus_cache_dir(cache_dir) / f"{'-'.join(sources)}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if not (folder / "documents.jsonl").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
        t0 = time.perf_counter()
        records: list[dict] = []
        parts: list[np.ndarray] = []
        pending: list[Document] = []

        def encode() -> None:
            for doc, enc in zip(pending, tokenizer.encode_batch([d.text for d in pending], add_special_tokens=False)):
                records.append({"id": doc.doc_id, "tokens": len(enc.ids), "group": split_group(doc), **doc.metadata()})
                parts.append(np.array(enc.ids, np.uint16))
            pending.clear()

        for doc in corpus_documents(sources, max_docs):
            pending.append(doc)
            if len(pending) == 256:
                encode()
        encode()
        stream = _stream(parts)

        def write(tmp: Path) -> None:
            np.save(tmp / "tokens.npy", stream.tokens)
            np.save(tmp / "doc_starts.npy", stream.doc_starts)
            (tmp / "documents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # last: the marker

        _write_folder(folder, write)
        log(f"corpus: {len(records)} documents, {len(stream.tokens)} tokens, tokenised in "
            f"{time.perf_counter() - t0:.0f} s into {folder}")
    records = [json.loads(line) for line in (folder / "documents.jsonl").read_text().splitlines()]
    return folder, TokenSplit(np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "doc_starts.npy")), records


def build_corpus(model_dir: Path, sources: Sequence[str] = SOURCES, max_docs: Optional[int] = None,
                 heldout_permille: int = 20, cache_dir: Optional[Path] = None, log=print) -> Corpus:
    """The tokenised corpus split into train and held-out, built on first use and read from the
    cache after (~1 s); a new split of documents already tokenised takes seconds.

    A document is held out when sha1(its group) mod 1000 < heldout_permille (`split_group`);
    held-out documents that share any token 13-gram with the train split are then dropped
    (stats["heldout_dropped"]): they belong to neither split."""
    docs_folder, everything, records = tokenised_documents(model_dir, sources, max_docs, cache_dir, log)
    folder = docs_folder / f"split-{heldout_permille}-n{NGRAM}"
    if (folder / "stats.json").is_file():
        return load_corpus(folder)
    t0 = time.perf_counter()
    starts = everything.doc_starts
    parts = [np.asarray(everything.tokens[starts[d] : starts[d + 1] - 1]) for d in range(len(records))]
    held = [int(hashlib.sha1(r["group"].encode()).hexdigest(), 16) % 1000 < heldout_permille for r in records]
    train_ids = [d for d in range(len(records)) if not held[d]]
    held_ids = [d for d in range(len(records)) if held[d]]
    train = _stream([parts[d] for d in train_ids])
    heldout = _stream([parts[d] for d in held_ids])
    train_grams = np.unique(ngram_hashes(train.tokens, train.doc_starts)[0])
    h, owner = ngram_hashes(heldout.tokens, heldout.doc_starts)
    overlapping = set(np.unique(owner[np.isin(h, train_grams)]).tolist())
    dropped = [held_ids[i] for i in sorted(overlapping)]
    held_ids = [d for i, d in enumerate(held_ids) if i not in overlapping]
    heldout = _stream([parts[d] for d in held_ids])
    stats = _stats(sources, [records[d] for d in train_ids], [records[d] for d in held_ids],
                   [records[d] for d in dropped])
    stats["heldout_permille"] = heldout_permille
    stats["split_seconds"] = round(time.perf_counter() - t0, 1)

    def write(tmp: Path) -> None:
        for name, split, ids in (("train", train, train_ids), ("heldout", heldout, held_ids)):
            np.save(tmp / f"{name}_tokens.npy", split.tokens)
            np.save(tmp / f"{name}_doc_starts.npy", split.doc_starts)
            (tmp / f"{name}_documents.jsonl").write_text("".join(json.dumps(records[d]) + "\n" for d in ids))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))  # written last: marks a whole build

    _write_folder(folder, write)
    log(f"corpus: {stats['train']['tokens']} train / {stats['heldout']['tokens']} held-out tokens "
        f"({stats['heldout_dropped']['documents']} held-out documents, {stats['heldout_dropped']['tokens']} tokens, "
        f"dropped for 13-gram overlap with train) in {folder}")
    return load_corpus(folder)


def _stats(sources, train: list[dict], heldout: list[dict], dropped: list[dict]) -> dict:
    def tally(records) -> dict:
        by_source: dict[str, dict[str, int]] = {}
        for r in records:
            s = by_source.setdefault(r["source"], {"documents": 0, "tokens": 0})
            s["documents"] += 1
            s["tokens"] += r["tokens"] + 1
        return {"documents": len(records), "tokens": sum(v["tokens"] for v in by_source.values()), "by_source": by_source}

    licences: dict[str, int] = {}
    for r in train + heldout:  # tokens per licence family (the first name of each package's list)
        family = re.split(r"[ ;,(]", r["licence"].strip())[0] or "unknown"
        licences[family] = licences.get(family, 0) + r["tokens"] + 1
    return {"sources": list(sources), "train": tally(train), "heldout": tally(heldout),
            "heldout_dropped": tally(dropped),
            "tokens_by_licence": dict(sorted(licences.items(), key=lambda kv: -kv[1]))}


def load_corpus(folder: Path) -> Corpus:
    folder = Path(folder)
    splits = {name: TokenSplit(np.load(folder / f"{name}_tokens.npy", mmap_mode="r"),
                               np.load(folder / f"{name}_doc_starts.npy")) for name in ("train", "heldout")}
    return Corpus(folder, splits["train"], splits["heldout"], json.loads((folder / "stats.json").read_text()))


def documents_of(folder: Path, split: str) -> Iterable[dict]:
    """The per-document records (id, tokens, source, package, licence) of a cached split."""
    with open(Path(folder) / f"{split}_documents.jsonl") as f:
        for line in f:
            yield json.loads(line)
