"""The `memlm` command line (typer): `serve` runs the service; the other commands are clients.

Every client command takes `--address HOST:PORT` (env `MEMLM_ADDRESS`, default 127.0.0.1:50051)
and `--api-key` (env `MEMLM_API_KEY`). Errors from the server are printed as
`error: CODE: message` on stderr with exit status 1.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from memlm.errors import MemlmError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="memlm: memory-augmented language-model service.")
out = Console()
err = Console(stderr=True)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}

AddressOpt = typer.Option("127.0.0.1:50051", "--address", envvar="MEMLM_ADDRESS", help="server HOST:PORT")
ApiKeyOpt = typer.Option(None, "--api-key", envvar="MEMLM_API_KEY", help="API key, when the server needs one")
TimeoutOpt = typer.Option(600.0, "--timeout", help="deadline per call, seconds")


def _fail(exc: MemlmError) -> None:
    err.print(f"[red]error:[/red] {exc.code}: {exc}", markup=True, highlight=False)
    raise typer.Exit(1)


@contextmanager
def _connected(address: str, api_key: Optional[str], timeout: float):
    """A client for one command; a server error ends the command with `error: CODE: message`."""
    from memlm.client import Client

    try:
        with Client(address, api_key=api_key, timeout=timeout) as client:
            yield client
    except MemlmError as exc:
        _fail(exc)


def _parse_filter(text: Optional[str]):
    if not text:
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
    model: Optional[str] = typer.Option(None, "--model", help="a local HF causal-LM folder (default: bundled SmolLM2)"),
    log_level: Optional[str] = typer.Option(None, "--log-level"),
) -> None:
    """Run the service on its embedded defaults (LMDB + FAISS in --data-dir, the bundled model).

    Options override env MEMLM_* variables, which override the --config file.
    """
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
        k: v for k, v in {"host": host, "port": port, "api_key": api_key, "metrics_port": metrics_port}.items()
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


def _iter_files(paths: List[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                    if p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES:
                        yield p
        elif path.is_file():
            yield path
        else:
            err.print(f"skipped {path}: no such file or folder")


def _read_documents(paths: List[Path], skipped: list) -> Iterator[dict]:
    """Documents from files: text/Markdown files whole (id = the path), JSONL one per line with
    `id`, `text`, `metadata`. Unreadable files and lines are reported and skipped."""
    for path in _iter_files(paths):
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            skipped.append(path)
            err.print(f"skipped {path}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        except OSError as exc:
            skipped.append(path)
            err.print(f"skipped {path}: {exc.strerror}")
            continue
        if path.suffix.lower() in JSONL_SUFFIXES:
            for lineno, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("text"), str):
                        raise ValueError("expected an object with `id` and string `text`")
                except ValueError as exc:
                    skipped.append(f"{path}:{lineno}")
                    err.print(f"skipped {path}:{lineno}: {exc}")
                    continue
                meta = obj.get("metadata") or {}
                yield {"id": str(obj["id"]), "text": obj["text"], "metadata": meta}
        else:
            kind = "markdown" if path.suffix.lower() in {".md", ".markdown"} else "text"
            yield {"id": path.as_posix(), "text": raw, "metadata": {"source": path.as_posix(), "format": kind}}


@app.command()
def ingest(
    paths: List[Path] = typer.Argument(..., help="files and folders: .txt, .md, .jsonl (id/text/metadata)"),
    collection: str = typer.Option(..., "--collection", "-c"),
    index_factory: str = typer.Option("", "--index-factory", help="FAISS factory string for a new collection"),
    chunk_tokens: int = typer.Option(0, "--chunk-tokens", help="chunk size for a new collection (0: default 64)"),
    kv_memory: bool = typer.Option(False, "--kv-memory", help="create the collection with KV memory on"),
    batch_size: int = typer.Option(32, "--batch-size", help="documents per atomic Ingest call"),
    address: str = AddressOpt,
    api_key: Optional[str] = ApiKeyOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Chunk, embed, index and store documents (creates the collection if it is missing)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    skipped: list = []
    with _connected(address, api_key, timeout) as client:
        client.create_collection(
            collection, index_factory=index_factory, chunk_tokens=chunk_tokens, kv_memory=kv_memory or None,
            if_not_exists=True,
        )
        files = list(_iter_files(paths))
        with Progress(
            TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"), TimeElapsedColumn(),
            console=err, transient=False,
        ) as bar:
            task = bar.add_task("ingest", total=None)
            report = client.ingest(
                _read_documents(paths, skipped), collection=collection, batch_size=batch_size,
                skip_invalid=True, progress=lambda n: bar.update(task, completed=n),
            )
    for r in report.rejected:
        err.print(f"rejected {r.id}: {r.error_code}: {r.message}", highlight=False)
    out.print(
        f"{len(files)} files: {report.created} documents created, {report.replaced} replaced, "
        f"{len(report.rejected)} rejected, {len(skipped)} skipped; {report.chunks} chunks in '{collection}'",
        highlight=False,
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
    timeout: float = TimeoutOpt,
) -> None:
    """Ranked chunks with scores, document ids and metadata."""
    with _connected(address, api_key, timeout) as client:
        hits = client.search(query, collection=collection, k=k, filter=_parse_filter(filter), mode=mode)
    if as_json:
        sys.stdout.write(json.dumps([_hit_json(h) for h in hits], ensure_ascii=False) + "\n")
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
    memory: str = typer.Option("rag", "--memory", help="none, rag, knn (landmark, retro, rmt: later)"),
    k: int = typer.Option(0, "-k", "--k", help="rag: chunks to retrieve; knn: memory rows per head and layer (0: server default)"),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", help="0: server default"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: List[str] = typer.Option([], "--stop", help="stop sequence (repeatable)"),
    filter: Optional[str] = typer.Option(None, "--filter", help="JSON metadata filter for retrieval"),
    search_mode: Optional[str] = typer.Option(None, "--search-mode", help="retrieval: dense, lexical or hybrid; default: the server's"),
    address: str = AddressOpt,
    api_key: Optional[str] = ApiKeyOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Stream an answer to the terminal, then the chunks it used."""
    with _connected(address, api_key, timeout) as client:
        stream = client.generate(
            prompt, collection=collection, memory=memory, k=k, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed, stop=stop, filter=_parse_filter(filter),
            search_mode=search_mode,
        )
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        result = stream.result
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
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, timeout: float = TimeoutOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List collections."""
    with _connected(address, api_key, timeout) as client:
        configs = client.list_collections()
    if as_json:
        from dataclasses import asdict

        sys.stdout.write(json.dumps([asdict(c) for c in configs]) + "\n")
        return
    table = Table("name", "embedding", "dim", "index", "chunk tokens", "kv memory")
    for c in configs:
        table.add_row(c.name, c.embedding_model, str(c.dim), c.index_factory, str(c.chunk_tokens), str(c.kv_memory))
    out.print(table)


@app.command()
def stats(
    collection: str = typer.Option("", "--collection", "-c", help="one collection (default: all)"),
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, timeout: float = TimeoutOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Document, chunk and index counts."""
    from google.protobuf.json_format import MessageToDict

    with _connected(address, api_key, timeout) as client:
        reply = client.stats(collection)
    if as_json:
        sys.stdout.write(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True)) + "\n")
        return
    table = Table("collection", "documents", "chunks", "index vectors", "index", "pending ops", "disk MB")
    for c in reply.collections:
        table.add_row(
            c.config.name, str(c.documents), str(c.chunks), str(c.index_vectors), c.config.index_factory,
            str(c.pending_ops), f"{c.disk_bytes / 1e6:.1f}",
        )
    out.print(table)
    out.print(f"memlm {reply.version}, model {reply.model.name}, up {reply.uptime_s:.0f} s", highlight=False)


@app.command("create-collection")
def create_collection(
    name: str = typer.Argument(...),
    index_factory: str = typer.Option("", "--index-factory"),
    chunk_tokens: int = typer.Option(0, "--chunk-tokens"),
    chunk_overlap: int = typer.Option(0, "--chunk-overlap"),
    kv_memory: bool = typer.Option(False, "--kv-memory"),
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, timeout: float = TimeoutOpt,
) -> None:
    """Create a collection (its index type and chunking are fixed from then on)."""
    with _connected(address, api_key, timeout) as client:
        c = client.create_collection(
            name, index_factory=index_factory, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
            kv_memory=kv_memory,
        )
    out.print(f"created '{c.name}': {c.index_factory}, {c.dim}-d {c.embedding_model}, {c.chunk_tokens}-token chunks")


@app.command()
def drop(
    collection: str = typer.Argument(...),
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, timeout: float = TimeoutOpt,
) -> None:
    """Drop a collection and everything in it."""
    with _connected(address, api_key, timeout) as client:
        client.drop_collection(collection)
    out.print(f"dropped '{collection}'")


@app.command()
def get(
    ids: List[str] = typer.Argument(...),
    collection: str = typer.Option(..., "--collection", "-c"),
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, timeout: float = TimeoutOpt,
) -> None:
    """Print documents as JSON lines."""
    with _connected(address, api_key, timeout) as client:
        docs = client.get(ids, collection=collection)
    for d in docs:
        sys.stdout.write(json.dumps({"id": d.id, "text": d.text, "metadata": d.metadata}, ensure_ascii=False) + "\n")


@app.command()
def delete(
    ids: List[str] = typer.Argument(...),
    collection: str = typer.Option(..., "--collection", "-c"),
    address: str = AddressOpt, api_key: Optional[str] = ApiKeyOpt, timeout: float = TimeoutOpt,
) -> None:
    """Delete documents everywhere they went."""
    with _connected(address, api_key, timeout) as client:
        deleted = client.delete(ids, collection=collection)
    missing = [i for i in ids if i not in set(deleted)]
    out.print(f"deleted {len(deleted)}" + (f"; not found: {', '.join(missing)}" if missing else ""), highlight=False)


if __name__ == "__main__":
    app()
