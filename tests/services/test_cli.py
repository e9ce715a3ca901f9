"""The `memlm` CLI as a user runs it, against the real server."""
import json
import os
import subprocess
import sys

import pytest


pytestmark = pytest.mark.server


def memlm(*args, check=True, timeout=300, cwd=None, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "memlm.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, **(env or {})},
    )
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
    assert stats["collections"][0]["documents"] == 4


def test_cli_errors_are_clear(server):
    addr = ("--address", server.address)
    proc = memlm("search", "x", "--collection", "missing-coll", *addr, check=False)
    assert proc.returncode == 1 and "NOT_FOUND" in proc.stderr and "missing-coll" in proc.stderr
    proc = memlm("ask", "x", "--collection", "c", "--memory", "telepathy", *addr, check=False)
    assert proc.returncode == 1 and "INVALID_ARGUMENT" in proc.stderr and "telepathy" in proc.stderr
    proc = memlm("collections", "--address", "127.0.0.1:1", "--timeout", "2", check=False)
    assert proc.returncode == 1 and ("UNAVAILABLE" in proc.stderr or "DEADLINE_EXCEEDED" in proc.stderr)


def test_delete_by_id_or_filter(server, client, collection):
    addr = ("--address", server.address, "--collection", collection)
    client.ingest([{"id": f"n{i}", "text": f"note {i}", "metadata": {"src": "a" if i < 3 else "b", "k": i}}
                   for i in range(5)], collection=collection)
    gone = json.loads(memlm("delete", "--filter", '{"src": "a"}', "--json", *addr).stdout)
    assert gone == {"deleted": ["n0", "n1", "n2"], "not_found": []}
    both = memlm("delete", "n3", "n4", "--filter", '{"k": 3}', *addr).stdout  # ids and a filter: the ids that match
    assert "deleted 1; not found: n4" in both
    proc = memlm("delete", "--filter", "{}", *addr, check=False)
    assert proc.returncode == 1 and "INVALID_ARGUMENT" in proc.stderr and "filter is empty" in proc.stderr
    proc = memlm("delete", *addr, check=False)
    assert proc.returncode == 2 and "ids or --filter" in proc.stderr
    assert [d.id for d in client.list_documents(collection=collection)] == ["n4"]


def test_ingest_ids_do_not_depend_on_how_the_path_is_typed(server, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("Lighthouses guide ships along dangerous coasts.\n")
    (corpus / "sub" / "b.md").write_text("Glaciers carve valleys over thousands of years.\n")
    addr = ("--address", server.address, "-c", "ids")
    memlm("ingest", "corpus/a.txt", *addr, cwd=tmp_path)
    memlm("ingest", str(corpus / "a.txt"), *addr, cwd=tmp_path)
    memlm("ingest", "a.txt", *addr, cwd=corpus)
    again = memlm("ingest", "corpus", *addr, cwd=tmp_path)  # the folder: ids relative to it
    assert "1 documents created, 0 replaced, 1 unchanged" in again.stdout  # a.txt is the same document
    memlm("ingest", str(corpus), "--id-prefix", "kb/", *addr)
    ids = [h["doc_id"] for h in json.loads(memlm("search", "ships", "-k", "10", "--json", *addr).stdout)]
    assert sorted(set(ids)) == ["a.txt", "kb/a.txt", "kb/sub/b.md", "sub/b.md"]
    stats = json.loads(memlm("stats", "--json", *addr).stdout)
    assert stats["collections"][0]["documents"] == 4


def test_ingest_stops_on_a_missing_path_and_stores_nothing(server, tmp_path):
    (tmp_path / "real.txt").write_text("A real document.\n")
    proc = memlm("ingest", str(tmp_path / "real.txt"), str(tmp_path / "nope.txt"), "-c", "missing-path",
                 "--address", server.address, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("nope.txt") == 1 and "no such file or folder" in proc.stderr
    assert "nothing was ingested" in proc.stderr and "created" not in proc.stdout
    names = [c["name"] for c in json.loads(memlm("collections", "--json", "--address", server.address).stdout)]
    assert "missing-path" not in names


def test_ingest_says_which_suffixes_it_reads_and_takes_glob(server, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README").write_text("Ferns reproduce with spores rather than seeds.\n")
    (notes / "day.log").write_text("Moss grows on the shaded side of the stones.\n")
    addr = ("-c", "globbed", "--address", server.address)
    proc = memlm("ingest", str(notes), *addr, check=False)
    assert proc.returncode == 2 and "nothing was ingested" in proc.stderr
    assert "2 files not read" in proc.stderr and ".txt" in proc.stderr and "--glob" in proc.stderr
    ok = memlm("ingest", str(notes), "--glob", "*", *addr)
    assert "2 documents created" in ok.stdout
    got = memlm("get", "README", "day.log", *addr).stdout.splitlines()
    assert {json.loads(line)["id"] for line in got} == {"README", "day.log"}


def test_ingest_progress_into_a_knn_collection_has_a_total(server, tmp_path):
    docs = tmp_path / "kv"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(f"Fact {i}: the locker code number {i} is {1000 + i}.\n")
    proc = memlm("ingest", str(docs), "-c", "kv-progress", "--kv-memory", "--batch-size", "2",
                 "--address", server.address)
    assert "embedding and storing: docs 1-2 of 3" in proc.stderr and "docs 3-3 of 3" in proc.stderr
    assert "3/3" in proc.stderr and "ETA" in proc.stderr
    assert "/?" not in proc.stderr


def test_ingest_with_memory_into_a_plain_collection_is_an_error(server, tmp_path):
    (tmp_path / "a.txt").write_text("Plain collection text.\n")
    addr = ("--address", server.address)
    memlm("create-collection", "plain-kv", *addr)
    for flag in (("--kv-memory",), ("--memory", "knn")):
        proc = memlm("ingest", str(tmp_path / "a.txt"), "-c", "plain-kv", *flag, *addr, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "ALREADY_EXISTS" in proc.stderr and "memory 'knn' is off" in proc.stderr and "created" not in proc.stdout
    assert json.loads(memlm("stats", "-c", "plain-kv", "--json", *addr).stdout)["collections"][0]["documents"] == 0
    memlm("ingest", str(tmp_path / "a.txt"), "-c", "plain-kv", *addr)  # without the flag it is fine


def test_every_json_output_is_snake_case_with_numbers(server, tmp_path):
    addr = ("--address", server.address)
    (tmp_path / "owls.txt").write_text("Owls hunt at night and can turn their heads very far.\n")
    made = json.loads(memlm("create-collection", "js", "--chunk-tokens", "32", "--json", *addr).stdout)
    assert made["name"] == "js" and made["chunk_tokens"] == 32 and made["memory"] == {}
    ingested = json.loads(memlm("ingest", str(tmp_path / "owls.txt"), "-c", "js", "--json", *addr).stdout)
    assert ingested["created"] == 1 and ingested["files"] == 1 and ingested["rejected"] == [] and ingested["chunks"] >= 1
    assert ingested["results"][0]["id"] == "owls.txt" and ingested["results"][0]["status"] == "created"

    stats = json.loads(memlm("stats", "-c", "js", "--json", *addr).stdout)
    info = stats["collections"][0]
    assert info["documents"] == 1 and isinstance(info["chunks"], int) and isinstance(info["disk_bytes"], int)
    assert info["config"]["index_factory"] and "indexFactory" not in info["config"] and "uptime_s" in stats
    listed = json.loads(memlm("collections", "--json", *addr).stdout)
    assert {"name", "chunk_tokens", "memory"} <= set(next(c for c in listed if c["name"] == "js"))

    answer = json.loads(memlm("ask", "When do owls hunt?", "-c", "js", "--max-new-tokens", "4", "--json", *addr).stdout)
    assert isinstance(answer["text"], str) and answer["completion_tokens"] >= 1
    assert answer["citations"][0]["doc_id"] == "owls.txt" and "total_ms" in answer["timings"]
    got = json.loads(memlm("get", "owls.txt", "-c", "js", "--json", *addr).stdout)
    assert got[0]["id"] == "owls.txt" and got[0]["chunk_ids"] and isinstance(got[0]["updated_at"], float)

    deleted = json.loads(memlm("delete", "owls.txt", "ghost", "-c", "js", "--json", *addr).stdout)
    assert deleted == {"deleted": ["owls.txt"], "not_found": ["ghost"]}
    assert json.loads(memlm("drop", "js", "--json", *addr).stdout) == {"dropped": "js"}


def test_cli_talks_to_a_tls_server(tmp_path, tls_server):
    server, cert = tls_server
    addr = ("--address", server.address)
    assert "created 'secure'" in memlm("create-collection", "secure", "--tls-ca", str(cert), *addr).stdout
    try:
        listed = memlm("collections", "--json", *addr, env={"MEMLM_TLS_CA": str(cert)})
        assert [c["name"] for c in json.loads(listed.stdout)] == ["secure"]
        plain = memlm("collections", *addr, "--timeout", "5", check=False)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
        missing = memlm("collections", *addr, "--tls-ca", str(tmp_path / "nope.pem"), check=False)
        assert missing.returncode == 2 and "nope.pem" in missing.stderr and "PEM" in missing.stderr
    finally:
        memlm("drop", "secure", "--tls-ca", str(cert), *addr)  # the session's TLS server stays empty
