"""The `memlm` command line (typer): `serve` runs the service; the other commands are clients.

Every client command takes `--address HOST:PORT` (env `MEMLM_ADDRESS`, default 127.0.0.1:50051),
`--api-key` (env `MEMLM_API_KEY`) and `--tls-ca FILE` (env `MEMLM_TLS_CA`: talk TLS to a server
whose certificate that CA file verifies). Errors from the server are printed as
`error: CODE: message` on stderr with exit status 1; bad arguments exit 2. Every `--json` prints
one JSON value on stdout with snake_case keys and numbers as numbers.

The client commands need only the client dependencies (grpcio, protobuf, numpy, typer, rich);
`serve` needs `memlm[server]`.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys


def _keep_openmp_spinning() -> None:
    """Before torch loads libgomp (it reads these once): OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT=300000.

    libgomp throttles its idle threads' spinning to almost nothing once it manages more threads
    than there are CPUs, and that happens as soon as a second thread runs parallel regions: the
    server's model worker, after the main thread loaded the model. Each of a decode step's ~150
    parallel regions then waits on a futex wake-up: on 2 cores a C matmul call took 77 us from a
    worker thread against 21 from the main thread, and a served token 13-17 ms against 8. These
    two settings are libgomp's own unthrottled behaviour (spin 300k rounds, then sleep) whatever the
    thread count. A user's own OpenMP settings win; a process that loaded torch first is left as is."""
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
        os.environ["GOMP_SPINCOUNT"] = "300000"


_keep_openmp_spinning()
from contextlib import contextmanager
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from memlm import modes as registry
from memlm.errors import MemlmError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="memlm: memory-augmented language-model service.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one line per message: greppable in logs

AddressOpt = typer.Option("127.0.0.1:50051", "--address", envvar="MEMLM_ADDRESS", help="server HOST:PORT")
ApiKeyOpt = typer.Option(None, "--api-key", envvar="MEMLM_API_KEY", help="API key, when the server needs one")
TlsCaOpt = typer.Option(
    None, "--tls-ca", envvar="MEMLM_TLS_CA", help="PEM CA certificate(s): connect with TLS, verifying the server against them",
)
TimeoutOpt = typer.Option(600.0, "--timeout", help="deadline per call, seconds")
JsonOpt = typer.Option(False, "--json", help="print one JSON value (snake_case keys) instead of text")

# What `serve` imports that a client-only install (`pip install memlm`) does not have.
SERVER_MODULES = ("torch", "transformers", "sentence_transformers", "faiss", "lmdb", "pydantic_settings")


def _fail(exc: MemlmError) -> None:
    err.print(f"[red]error:[/red] {exc.code}: {exc}", markup=True, highlight=False)
    raise typer.Exit(1)


def _usage_error(message: str) -> None:
    err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(2)


def _require_server_dependencies() -> None:
    """One clear line instead of a traceback when `serve` runs on a client-only install."""
    from importlib.util import find_spec

    def absent(name: str) -> bool:
        try:
            return find_spec(name) is None
        except (ImportError, ValueError):
            return True

    missing = [m for m in SERVER_MODULES if absent(m)]
    if missing:
        err.print(
            f"error: `memlm serve` needs the server dependencies ({', '.join(missing)} not installed): "
            "pip install 'memlm[server]'", markup=False, highlight=False,
        )
        raise typer.Exit(1)


@contextmanager
def _connected(address: str, api_key: Optional[str], timeout: float, tls_ca: Optional[Path] = None):
    """A client for one command; a server error ends the command with `error: CODE: message`."""
    from memlm.client import Client

    root_certificates = None
    if tls_ca is not None:
        try:
            root_certificates = tls_ca.read_bytes()
        except OSError as exc:
            _usage_error(f"--tls-ca {tls_ca}: {exc.strerror or exc}; expected a PEM CA certificate file")
        if b"-----BEGIN CERTIFICATE-----" not in root_certificates:
            _usage_error(f"--tls-ca {tls_ca}: no PEM certificate in it; expected a file with '-----BEGIN CERTIFICATE-----'")
    try:
        with Client(address, api_key=api_key, timeout=timeout, root_certificates=root_certificates) as client:
            yield client
    except MemlmError as exc:
        _fail(exc)


def _parse_filter(text: Optional[str]):
    if not text:
        return None
    return _filter_arg(text)


def _filter_arg(text: Optional[str]):
    """--filter's JSON as given (None when the option is absent; `{}` stays `{}`, for the server to refuse on delete)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        err.print(f"error: --filter is not valid JSON: {exc}")
        raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        import memlm

        print(f"memlm {memlm.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """memlm: memory-augmented language-model service."""


def _plain(value: Any) -> Any:
    """memlm's dataclasses, enums and protobuf messages as JSON-ready values, snake_case keys."""
    from google.protobuf.message import Message

    if isinstance(value, Message):
        return _message_dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _message_dict(msg) -> dict:
    """A protobuf message field by field: proto field names, int64 as numbers (protobuf's own JSON
    mapping gives camelCase and int64 as strings), enums by name, Structs as plain dicts."""
    from google.protobuf import struct_pb2
    from google.protobuf.descriptor import FieldDescriptor

    from memlm import wire

    if isinstance(msg, struct_pb2.Struct):
        return wire.struct_to_dict(msg)

    def one(f, v):
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            return _message_dict(v)
        if f.type == FieldDescriptor.TYPE_ENUM:
            return f.enum_type.values_by_number[v].name if v in f.enum_type.values_by_number else v
        return v

    result = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == FieldDescriptor.LABEL_REPEATED
        if repeated:
            result[f.name] = [one(f, x) for x in v]
        elif f.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(f.name):
            result[f.name] = None
        else:
            result[f.name] = one(f, v)
    return result


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(_plain(value), ensure_ascii=False) + "\n")


@app.command()
def serve(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where LMDB and FAISS files live"),
    host: Optional[str] = typer.Option(None, "--host", help="bind address (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, "--port", help="port (default 50051; 0 picks a free one)"),
    api_key_file: Optional[Path] = typer.Option(
        None, "--api-key-file", exists=True, dir_okay=False, readable=True,
        help="require `authorization: Bearer KEY`, KEY read from this file (one line); "
        "or set env MEMLM_SERVER__API_KEY",
    ),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", help="the key on the command line, visible to every user in `ps`: prefer "
        "--api-key-file or env MEMLM_SERVER__API_KEY",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", exists=True, dir_okay=False, readable=True,
        help="settings TOML file (same as env MEMLM_CONFIG; default ./memlm.toml when present)",
    ),
    metrics_port: Optional[int] = typer.Option(
        None, "--metrics-port", min=0, max=65535, help="serve Prometheus /metrics on this port (behind the API key when set)",
    ),
    http_port: Optional[int] = typer.Option(
        None, "--http-port", min=0, max=65535,
        help="also serve the OpenAI-compatible HTTP API on this port (0: a free one; behind the API key when set)",
    ),
    model: Optional[str] = typer.Option(None, "--model", help="a local HF causal-LM folder (default: bundled SmolLM2)"),
    log_level: Optional[str] = typer.Option(None, "--log-level"),
) -> None:
    """Run the service on its embedded defaults (LMDB + FAISS in --data-dir, the bundled model).

    Options override env MEMLM_* variables, which override the --config file.
    """
    _require_server_dependencies()
    import asyncio
    import logging
    import os

    from memlm.config import Settings
    from memlm.services.server import serve as run

    def fail(message: str) -> None:  # one plain line (rich would wrap it), then exit 1
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise typer.Exit(1)

    if api_key is not None and api_key_file is not None:
        fail("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        api_key = api_key_file.read_text(encoding="utf-8").strip()
        if not api_key:
            fail(f"--api-key-file {api_key_file} is empty; expected the key on one line")
    if config is not None:
        os.environ["MEMLM_CONFIG"] = str(config)  # Settings reads the TOML file it names
    overrides: dict = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if log_level is not None:
        overrides["log_level"] = log_level
    settings = Settings(**overrides)
    server_over = {
        k: v for k, v in {
            "host": host, "port": port, "api_key": api_key, "metrics_port": metrics_port, "http_port": http_port,
        }.items()
        if v is not None
    }
    if server_over:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update=server_over)})
    if model is not None:
        settings = settings.model_copy(update={"model": settings.model.model_copy(update={"path": model})})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is INFO noise
    try:
        asyncio.run(run(settings))
    except MemlmError as exc:
        fail(f"{exc.code}: {exc}")


def _select_files(paths: List[Path], globs: List[str], id_prefix: str):
    """The files to read, or exit 2 naming every missing path, id clash and empty folder."""
    from memlm.file_documents import READ_SUFFIXES, select_files

    sel = select_files(paths, globs=globs, id_prefix=id_prefix)
    problems = [f"{p}: no such file or folder" for p in sel.missing]
    problems += [
        f"{', '.join(p.as_posix() for p in ps)} would all be document {doc_id!r}; "
        "ingest their common folder instead, or one at a time with --id-prefix"
        for doc_id, ps in sel.duplicate_ids.items()
    ]
    how = f"memlm reads {' '.join(READ_SUFFIXES)} in folders; --glob PATTERN picks other files (read as text)"
    for folder, counts in sel.not_read.items():
        left = ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common())
        note = f"{folder}: {sum(counts.values())} files not read ({left}); {how}"
        if folder in sel.empty_folders:
            problems.append(note)
        else:
            err.print(f"note: {note}", markup=False, highlight=False)
    problems += [
        f"{folder}: no files" + (f" match --glob {' '.join(globs)}" if globs else "")
        for folder in sel.empty_folders if folder not in sel.not_read
    ]
    if problems:
        for line in problems:
            err.print(f"error: {line}", markup=False, highlight=False)
        err.print("nothing was ingested", highlight=False)
        raise typer.Exit(2)
    return sel.files


MemoryOpt = typer.Option(
    [], "--memory", help="a memory mode whose derived memory the collection keeps (repeatable; `memlm modes` lists "
    "them): knn keeps the model's keys and values; rag needs nothing. Fixed when the collection is created",
)
MemoryOptionOpt = typer.Option(
    [], "--memory-option", help="MODE.OPTION=VALUE for a new collection's memory (repeatable), e.g. knn.window=512 "
    "(VALUE read as JSON when it parses, else as text)",
)


def _memory_arg(memory: List[str], options: List[str], kv_memory: bool) -> dict[str, dict[str, Any]]:
    """--memory / --memory-option / --kv-memory -> {mode: options}; exit 2 on a malformed option."""
    out: dict[str, dict[str, Any]] = {m.strip().lower(): {} for m in memory}
    if kv_memory:
        out.setdefault("knn", {})
    for item in options:
        key, sep, value = item.partition("=")
        mode, dot, option = key.strip().partition(".")
        if not sep or not dot or not mode or not option:
            err.print(f"error: --memory-option {item!r}: expected MODE.OPTION=VALUE, e.g. knn.window=512",
                      markup=False, highlight=False)
            raise typer.Exit(2)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(mode.lower(), {})[option] = parsed
    return out


def _open_collection(client, collection: str, index_factory: str, chunk_tokens: int, memory: dict[str, dict]):
    """Create the collection if it is missing; exit 1 when it exists with settings other than the
    ones given (an existing collection's index, chunking and memory modes are fixed): the server
    answers ALREADY_EXISTS naming them."""
    given = {"index_factory": index_factory, "chunk_tokens": chunk_tokens}
    given = {k: v for k, v in given.items() if v}
    try:
        return client.create_collection(collection, if_not_exists=True, memory=memory or None, **given)
    except MemlmError as e:
        if e.code != "ALREADY_EXISTS":
            raise
        err.print(f"[red]error:[/red] ALREADY_EXISTS: {e}; drop it first or ingest without those options",
                  markup=True, highlight=False)
        raise typer.Exit(1) from None


@app.command()
def ingest(
    paths: List[Path] = typer.Argument(..., help="files and folders: .txt .md .markdown .rst .text, and .jsonl/.ndjson (id/text/metadata per line)"),
    collection: str = typer.Option(..., "--collection", "-c"),
    glob: List[str] = typer.Option([], "--glob", help="in folders, read the files matching this pattern (repeatable, e.g. '*' or 'docs/**/*.log') instead of the suffixes above"),
    id_prefix: str = typer.Option("", "--id-prefix", help="put in front of each file's document id (ids are relative to the folder named, or the file's name)"),
    index_factory: str = typer.Option("", "--index-factory", help="FAISS factory string for a new collection"),
    chunk_tokens: int = typer.Option(0, "--chunk-tokens", help="chunk size for a new collection (0: default 64)"),
    memory: List[str] = MemoryOpt,
    memory_option: List[str] = MemoryOptionOpt,
    kv_memory: bool = typer.Option(False, "--kv-memory", help="the older spelling of --memory knn"),
    batch_size: int = typer.Option(32, "--batch-size", help="documents per atomic Ingest call"),
    as_json: bool = JsonOpt,
    address: str = AddressOpt,
    api_key: Optional[str] = ApiKeyOpt,
    tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Chunk, embed, index and store documents (creates the collection if it is missing).

    A file's document id is its path relative to the folder named on the command line (a file named directly: its name), so re-ingesting from anywhere replaces rather than duplicates. A missing path, or a folder with nothing to read, stops the command before anything is sent.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from memlm.file_documents import count_documents, read_documents

    files = _select_files(paths, glob, id_prefix)
    total = count_documents(files)
    skipped: list[tuple[str, str]] = []

    def skip(where: str, why: str) -> None:
        skipped.append((where, why))
        err.print(f"skipped {where}: {why}", markup=False, highlight=False)

    with _connected(address, api_key, timeout, tls_ca) as client:
        config = _open_collection(client, collection, index_factory, chunk_tokens,
                                  _memory_arg(memory, memory_option, kv_memory))
        # The server embeds and stores each batch; a collection's derived memory (knn's KV memory)
        # is built after (or, with knn.ingest_waits_for_memory, before) it answers.
        stage = "embedding and storing"
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=False,
        ) as bar:
            task = bar.add_task("reading files", total=total)

            def sending(first: int, size: int) -> None:
                bar.update(task, description=f"{stage}: docs {first + 1}-{first + size}")
                if not err.is_terminal:  # no live bar in a log: one line per batch instead
                    err.print(f"ingest: {stage}: docs {first + 1}-{first + size} of {total}", highlight=False)

            report = client.ingest(
                read_documents(files, skip), collection=collection, batch_size=batch_size, skip_invalid=True,
                progress=lambda n: bar.update(task, completed=n + len(skipped), description="reading files"),
                before_batch=sending,
            )
            bar.update(task, completed=total, description="done")
        lag = client.describe_collection(collection).memory_lag if config.memory else {}
    behind = {m: n for m, n in lag.items() if n}
    if behind and not as_json:
        err.print("derived memory still building: " + ", ".join(f"{m} ({n} writes behind)" for m, n in behind.items())
                  + f"; `memlm stats -c {collection}` shows it, and a generation in that mode waits for it",
                  highlight=False, markup=False)
    for r in report.rejected:
        err.print(f"rejected {r.id}: {r.error_code}: {r.message}", highlight=False, markup=False)
    unchanged = getattr(report, "unchanged", None)  # counted by servers that skip unchanged re-ingests
    if as_json:
        _print_json({
            "collection": collection, "files": len(files), "created": report.created, "replaced": report.replaced,
            **({"unchanged": unchanged} if unchanged is not None else {}),
            "rejected": [{"id": r.id, "error_code": r.error_code, "message": r.message} for r in report.rejected],
            "skipped": [{"source": w, "reason": why} for w, why in skipped],
            "chunks": report.chunks, "results": report.results,
        })
        return
    out.print(
        f"{len(files)} files: {report.created} documents created, {report.replaced} replaced, "
        + (f"{unchanged} unchanged, " if unchanged is not None else "")
        + f"{len(report.rejected)} rejected, {len(skipped)} skipped; {report.chunks} chunks in '{collection}'",
        highlight=False, markup=False,
    )


def _hit_json(h) -> dict:
    return {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": h.score, "text": h.text, "metadata": h.metadata}


@app.command()
def search(
    query: str = typer.Argument(...),
    collection: str = typer.Option(..., "--collection", "-c"),
    k: int = typer.Option(5, "-k", "--k"),
    filter: Optional[str] = typer.Option(None, "--filter", help='JSON, e.g. \'{"lang": "en"}\''),
    mode: Optional[str] = typer.Option(None, "--mode", help="dense, lexical (BM25) or hybrid; default: the server's"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON list of hits"),
    address: str = AddressOpt,
    api_key: Optional[str] = ApiKeyOpt,
    tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Ranked chunks with scores, document ids and metadata."""
    with _connected(address, api_key, timeout, tls_ca) as client:
        hits = client.search(query, collection=collection, k=k, filter=_parse_filter(filter), mode=mode)
    if as_json:
        _print_json([_hit_json(h) | {"chunk_index": h.chunk_index, "start": h.start, "end": h.end} for h in hits])
        return
    table = Table("#", "score", "document", "chunk", "text")
    for i, h in enumerate(hits, 1):
        text = " ".join(h.text.split())
        table.add_row(str(i), f"{h.score:.3f}", h.doc_id, str(h.chunk_id), text[:120] + ("…" if len(text) > 120 else ""))
    out.print(table)


@app.command()
def ask(
    prompt: str = typer.Argument(...),
    collection: str = typer.Option("", "--collection", "-c"),
    memory: str = typer.Option("rag", "--memory", help="the memory mode: " + ", ".join(registry.MODES) + " (`memlm modes`)"),
    k: int = typer.Option(0, "-k", "--k", help="rag: chunks to retrieve; knn: memory rows per head and layer (0: server default)"),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", help="0: server default"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: List[str] = typer.Option([], "--stop", help="stop sequence (repeatable)"),
    filter: Optional[str] = typer.Option(None, "--filter", help="JSON metadata filter for retrieval"),
    search_mode: Optional[str] = typer.Option(None, "--search-mode", help="retrieval: dense, lexical or hybrid; default: the server's"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (text, citations, token counts, timings) when done, instead of streaming"),
    address: str = AddressOpt,
    api_key: Optional[str] = ApiKeyOpt,
    tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Stream an answer to the terminal, then the chunks it used."""
    with _connected(address, api_key, timeout, tls_ca) as client:
        stream = client.generate(
            prompt, collection=collection, memory=memory, k=k, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed, stop=stop, filter=_parse_filter(filter),
            search_mode=search_mode,
        )
        for piece in stream:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        result = stream.result
    if as_json:
        _print_json(result)
        return
    sys.stdout.write("\n")
    if result.citations:
        out.print("\n[bold]citations[/bold]")
        for i, h in enumerate(result.citations, 1):
            text = " ".join(h.text.split())
            out.print(f"[{i}] {h.doc_id} (chunk {h.chunk_id}, score {h.score:.3f}): {text[:100]}", highlight=False, markup=False)
    t = result.timings
    err.print(
        f"{result.completion_tokens} tokens, {result.finish_reason}; prompt {result.prompt_tokens} tokens"
        f"{f' ({result.truncated_prompt_tokens} truncated)' if result.truncated_prompt_tokens else ''}; "
        f"retrieval {t.retrieval_ms:.0f} ms, first token {t.time_to_first_token_ms:.0f} ms, total {t.total_ms:.0f} ms",
        highlight=False,
    )


@app.command()
def collections(
    as_json: bool = JsonOpt,
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """List collections."""
    with _connected(address, api_key, timeout, tls_ca) as client:
        configs = client.list_collections()
    if as_json:
        _print_json(configs)
        return
    table = Table("name", "embedding", "dim", "index", "chunk tokens", "memory")
    for c in configs:
        table.add_row(c.name, c.embedding_model, str(c.dim), c.index_factory, str(c.chunk_tokens), ", ".join(c.memory) or "-")
    out.print(table)


@app.command()
def stats(
    collection: str = typer.Option("", "--collection", "-c", help="one collection (default: all)"),
    as_json: bool = JsonOpt,
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Document, chunk and index counts."""
    with _connected(address, api_key, timeout, tls_ca) as client:
        reply = client.stats(collection)
    if as_json:
        _print_json(reply)
        return
    table = Table("collection", "documents", "chunks", "index vectors", "index", "pending ops", "memory lag", "disk MB")
    for c in reply.collections:
        lag = ", ".join(f"{m} {n}" for m, n in sorted(c.memory_lag.items())) or "-"
        table.add_row(
            c.config.name, str(c.documents), str(c.chunks), str(c.index_vectors), c.config.index_factory,
            str(c.pending_ops), lag, f"{c.disk_bytes / 1e6:.1f}",
        )
    out.print(table)
    for c in reply.collections:
        if c.problem:
            out.print(f"'{c.config.name}' is unavailable: {c.problem}", style="red", highlight=False)
    out.print(f"memlm {reply.version}, model {reply.model.name}, up {reply.uptime_s:.0f} s", highlight=False)


@app.command("create-collection")
def create_collection(
    name: str = typer.Argument(...),
    index_factory: str = typer.Option("", "--index-factory"),
    chunk_tokens: int = typer.Option(0, "--chunk-tokens"),
    chunk_overlap: int = typer.Option(0, "--chunk-overlap"),
    memory: List[str] = MemoryOpt,
    memory_option: List[str] = MemoryOptionOpt,
    kv_memory: bool = typer.Option(False, "--kv-memory", help="the older spelling of --memory knn"),
    as_json: bool = JsonOpt,
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Create a collection (its index type and chunking are fixed from then on)."""
    with _connected(address, api_key, timeout, tls_ca) as client:
        c = client.create_collection(
            name, index_factory=index_factory, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
            memory=_memory_arg(memory, memory_option, kv_memory) or None,
        )
    if as_json:
        _print_json(c)
        return
    modes = f"; memory: {', '.join(c.memory)}" if c.memory else ""
    out.print(f"created '{c.name}': {c.index_factory}, {c.dim}-d {c.embedding_model}, {c.chunk_tokens}-token chunks{modes}")


@app.command()
def modes(as_json: bool = JsonOpt) -> None:
    """The registered memory modes: what each reads, keeps per collection, and takes as options."""
    rows = []
    for name in registry.MODES:
        cls = registry.mode_class(name)
        try:
            options, settings = registry.collection_options_class(name), registry.settings_class(name)
        except ImportError:  # a client-only install (no pydantic): the options are the server's business
            options = settings = None
        rows.append({
            "mode": name,
            "summary": cls.summary,
            "needs": ("a collection" + (f" created with --memory {name}" if options else "")) if cls.reads_collection else "nothing",
            "keeps per collection": cls.derives or "-",
            "collection options": {k: f.default for k, f in options.model_fields.items()} if options else {},
            "settings": f"[{name}] / MEMLM_{name.upper()}__*" if settings else "-",
            "k": cls.k_means or "-",
        })
    if as_json:
        _print_json(rows)
        return
    from rich.markup import escape

    shown = ("mode", "summary", "needs", "collection options", "settings")
    table = Table(*shown)
    for r in rows:
        cells = [r[c] for c in shown]
        table.add_row(*(escape(", ".join(f"{k}={v}" for k, v in x.items()) or "-" if isinstance(x, dict) else str(x)) for x in cells))
    out.print(table)
    out.print("keeps per collection: " + "; ".join(f"{r['mode']}: {r['keeps per collection']}" for r in rows if r["keeps per collection"] != "-"),
              highlight=False, markup=False)


@app.command()
def drop(
    collection: str = typer.Argument(...),
    as_json: bool = JsonOpt,
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Drop a collection and everything in it."""
    with _connected(address, api_key, timeout, tls_ca) as client:
        client.drop_collection(collection)
    if as_json:
        _print_json({"dropped": collection})
        return
    out.print(f"dropped '{collection}'")


@app.command()
def reindex(
    collection: str = typer.Argument(...),
    index_factory: str = typer.Option("", "--index-factory", help="a FAISS factory string; default: the collection's own"),
    as_json: bool = JsonOpt,
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Rebuild a collection's index from its stored vectors (repairs an unavailable collection;
    with --index-factory, changes its index type)."""
    with _connected(address, api_key, timeout, tls_ca) as client:
        c = client.reindex_collection(collection, index_factory)
    if as_json:
        _print_json(c)
        return
    out.print(f"reindexed '{c.name}': {c.index_factory}")


@app.command()
def get(
    ids: List[str] = typer.Argument(...),
    collection: str = typer.Option(..., "--collection", "-c"),
    as_json: bool = typer.Option(False, "--json", help="one JSON list instead of one JSON object per line"),
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Print documents as JSON lines."""
    with _connected(address, api_key, timeout, tls_ca) as client:
        docs = client.get(ids, collection=collection)
    if as_json:
        _print_json(docs)
        return
    for d in docs:
        _print_json(d)


@app.command()
def delete(
    ids: Optional[List[str]] = typer.Argument(None, help="document ids (with --filter: those of them that match)"),
    collection: str = typer.Option(..., "--collection", "-c"),
    filter: Optional[str] = typer.Option(None, "--filter", help='JSON, e.g. \'{"source": "old.pdf"}\': the documents that match'),
    as_json: bool = JsonOpt,
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, tls_ca: Optional[Path] = TlsCaOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Delete documents everywhere they went: by id, or every one matching --filter, in one
    durable transaction. An empty filter is refused (it would match every document)."""
    if not ids and filter is None:
        _usage_error("delete needs document ids or --filter")
    with _connected(address, api_key, timeout, tls_ca) as client:
        deleted = client.delete(ids or None, collection=collection, filter=_filter_arg(filter))
    ids = ids or []
    missing = [i for i in ids if i not in set(deleted)]
    if as_json:
        _print_json({"deleted": deleted, "not_found": missing})
        return
    out.print(f"deleted {len(deleted)}" + (f"; not found: {', '.join(missing)}" if missing else ""), highlight=False)


from memlm.train.cli import app as train_app  # noqa: E402  (typer only: torch loads inside the commands)
app.add_typer(train_app, name="train")


if __name__ == "__main__":
    app()
