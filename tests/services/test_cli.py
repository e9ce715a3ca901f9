"""The `memlm` CLI as a user runs it, against the real server."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.server


def memlm(*args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "memlm.cli", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"memlm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_ingest_folder_search_ask_stats(server, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "whales.md").write_text("# Whales\n\nThe blue whale is the largest animal that ever lived.\n")
    (docs / "sub" / "tea.txt").write_text("Green tea is made from unoxidised leaves of Camellia sinensis.\n")
    (docs / "bad.txt").write_bytes(b"caf\xe9 latin-1 bytes, not UTF-8")
    (docs / "more.jsonl").write_text(
        json.dumps({"id": "j1", "text": "The vault pass key is 73019.", "metadata": {"kind": "secret"}}) + "\n"
        + "not json\n"
        + json.dumps({"id": "j2", "text": "Owls hunt at night.", "metadata": {"kind": "animal"}}) + "\n"
    )
    addr = ("--address", server.address)
    ingest = memlm("ingest", str(docs), "--collection", "cli", *addr)
    assert "bad.txt" in ingest.stderr and "UTF-8" in ingest.stderr
    assert "more.jsonl:2" in ingest.stderr
    assert "4 documents created" in ingest.stdout

    hits = json.loads(memlm("search", "largest animal", "--collection", "cli", "-k", "2", "--json", *addr).stdout)
    assert hits[0]["doc_id"].endswith("whales.md")
    assert set(hits[0]) >= {"doc_id", "chunk_id", "score", "text", "metadata"}
    hits = json.loads(memlm("search", "animal", "--collection", "cli", "--json", "--filter", '{"kind": "animal"}', *addr).stdout)
    assert [h["doc_id"] for h in hits] == ["j2"]
    hits = json.loads(memlm("search", "Camellia", "--collection", "cli", "--mode", "lexical", "--json", *addr).stdout)
    assert [h["doc_id"][-7:] for h in hits] == ["tea.txt"]  # BM25: the one chunk with the word

    ask = memlm("ask", "What is the vault pass key?", "--collection", "cli", "--memory", "rag", "--max-new-tokens", "10", *addr)
    assert "73019" in ask.stdout and "citations" in ask.stdout and "j1" in ask.stdout
    ask = memlm("ask", "What is the vault pass key?", "--collection", "cli", "--search-mode", "lexical",
                "--max-new-tokens", "10", *addr)
    assert "73019" in ask.stdout and "j1" in ask.stdout

    assert "cli" in memlm("collections", *addr).stdout
    stats = json.loads(memlm("stats", "--collection", "cli", "--json", *addr).stdout)
    assert int(stats["collections"][0]["documents"]) == 4


def test_cli_errors_are_clear(server):
    addr = ("--address", server.address)
    proc = memlm("search", "x", "--collection", "missing-coll", *addr, check=False)
    assert proc.returncode == 1 and "NOT_FOUND" in proc.stderr and "missing-coll" in proc.stderr
    proc = memlm("ask", "x", "--collection", "c", "--memory", "telepathy", *addr, check=False)
    assert proc.returncode == 1 and "INVALID_ARGUMENT" in proc.stderr and "telepathy" in proc.stderr
    proc = memlm("collections", "--address", "127.0.0.1:1", "--timeout", "2", check=False)
    assert proc.returncode == 1 and ("UNAVAILABLE" in proc.stderr or "DEADLINE_EXCEEDED" in proc.stderr)
