"""The change log derived memory reads (MemoryStore.last_seq / changes / set_watermark): the oplog is
kept back to the lowest watermark of a collection's memory modes (bounded by
store.oplog_retention_ops), a reader behind the floor is told to rebuild, Describe shows each
mode's lag, and drop leaves a mode's folder to the mode while telling it."""
from __future__ import annotations

from memlm.config import StoreSettings
from memlm.index.types import Document


def docs(prefix: str, n: int) -> list[Document]:
    return [Document(f"{prefix}{i}", f"Document {prefix} number {i} talks about lighthouses and tides.") for i in range(n)]


def test_oplog_is_kept_back_to_the_lowest_mode_watermark(store_factory):
    s = store_factory(StoreSettings(snapshot_every_ops=2))
    s.create_collection("plain")
    s.create_collection("kv", memory={"knn": {}})
    for i in range(4):  # 4 entries each; a snapshot after every 2
        s.ingest("plain", docs(f"p{i}-", 1))
        s.ingest("kv", docs(f"k{i}-", 1))
    assert s.last_seq("plain") == s.last_seq("kv") == 4
    # No mode reads "plain": its oplog goes as its index file takes the entries.
    assert s.changes("plain", 0, 4) is None and s.changes("plain", 4, 4) == []
    # "kv"'s knn memory has applied nothing: every entry is kept for it, in order, with its chunk ids.
    entries = s.changes("kv", 0, 4)
    assert [seq for seq, _, _ in entries] == [1, 2, 3, 4] and all(add and not rem for _, add, rem in entries)
    assert s.describe("kv").memory_lag == {"knn": 4} and s.describe("plain").memory_lag == {}

    s.set_watermark("kv", "knn", 3)
    assert s.describe("kv").memory_lag == {"knn": 1}
    s.ingest("kv", docs("k4-", 1))
    s.delete("kv", ["k0-0"])  # seq 6: a snapshot, which may now drop entries up to 3
    assert s.changes("kv", 2, 6) is None  # behind the floor: rebuild
    rest = s.changes("kv", 3, 6)
    assert [seq for seq, _, _ in rest] == [4, 5, 6] and rest[-1][1] == [] and rest[-1][2]
    assert [seq for seq, _, _ in s.changes("kv", 3, 5)] == [4, 5]  # upto bounds the answer


def test_a_mode_far_behind_does_not_keep_the_whole_oplog(store_factory):
    s = store_factory(StoreSettings(snapshot_every_ops=2, oplog_retention_ops=3))
    s.create_collection("kv", memory={"knn": {}})
    for i in range(8):
        s.ingest("kv", docs(f"k{i}-", 1))
    assert s.changes("kv", 0, 8) is None  # the mode never reported: it rebuilds
    assert s.changes("kv", 5, 8) is not None  # the last retention_ops entries are still there


def test_watermarks_and_the_floor_survive_a_restart(store_factory, tmp_path):
    s = store_factory(StoreSettings(snapshot_every_ops=1))
    s.create_collection("kv", memory={"knn": {}})
    s.ingest("kv", docs("a", 2))
    s.set_watermark("kv", "knn", 1)
    s.ingest("kv", docs("b", 2))
    s.close()
    s = store_factory(StoreSettings(snapshot_every_ops=1))
    assert s.last_seq("kv") == 2 and s.describe("kv").memory_lag == {"knn": 1}
    assert [seq for seq, _, _ in s.changes("kv", 1, 2)] == [2] and s.changes("kv", 0, 2) is None


def test_drop_leaves_a_modes_folder_to_the_mode_and_tells_it(store_factory, tmp_path):
    s = store_factory()
    heard = []
    s.add_write_listener(lambda name, memory, dropped=False: heard.append((name, dict(memory), dropped)))
    s.create_collection("kv", memory={"knn": {}})
    s.ingest("kv", docs("a", 1))
    mode_folder = s.collection_dir("kv") / "kv"
    mode_folder.mkdir()
    (mode_folder / "manifest.json").write_text("{}")
    s.drop("kv")
    assert heard[0][0] == "kv" and not heard[0][2] and heard[-1][2]  # the ingest, then the drop
    assert mode_folder.exists()  # the mode's to delete
    assert not any(p.is_file() for p in mode_folder.parent.iterdir())  # the store's own files are gone
