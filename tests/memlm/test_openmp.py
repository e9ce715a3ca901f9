"""`memlm.openmp.release_thread_pool`: a thread that ran parallel torch work gives its OpenMP worker
threads back (they would otherwise stay beside the model worker's team and throttle its barriers:
the served decode ran at ~95 instead of ~220 tok/s on 2 cores). Counted as OS threads of a fresh
process, so nothing else in the test session holds a team."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, sys, threading, time, torch
torch.set_num_threads(2)
from memlm.openmp import release_thread_pool

def threads():
    return len(os.listdir("/proc/self/task"))

x = torch.randn(1 << 22)
def work(release, out):
    x.exp()  # a parallel region: this thread's OpenMP team (its workers are OS threads)
    out.append(threads())
    out.append(release_thread_pool() if release else None)
    out.append(threads())

for release in (False, True):
    out = []
    t = threading.Thread(target=work, args=(release, out))
    t.start(); t.join()
    print(release, *out)
base = threads()
if sys.argv[1] == "embedder":
    from memlm.index.embedding import load_embedder
    e = load_embedder("all-MiniLM-L6-v2")
    e.count_tokens(["warm", "the tokenizer's own thread pool (not OpenMP)"])
    out = []
    def query():  # on a thread that stays, as a server's request threads do
        out.append(threads())
        e.embed_queries(["where is the lighthouse?", "who trims the wick?"])
        out.append(threads())
    t = threading.Thread(target=query)
    t.start(); t.join()
    time.sleep(0.5)  # the joined thread's OS task is gone from /proc a moment after join() returns
    before = threads()
    e.embed(["a document batch, on the embedder's own thread"] * 4)
    print("embedder", out[1] - out[0], threads() - before)
"""


def run(arg: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, arg], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def test_a_thread_gives_its_openmp_workers_back():
    kept, released = (line.split() for line in run("plain")[:2])
    # without the call the worker thread of the team outlives the work; with it, it is gone
    assert kept == ["False", kept[1], "None", kept[1]]
    assert released[0] == "True" and released[2] == "True"
    assert int(released[3]) == int(released[1]) - 1


def test_the_embedder_leaves_no_openmp_team_behind_on_the_calling_or_its_own_thread():
    line = next(l for l in run("embedder") if l.startswith("embedder"))
    _, query, bulk = line.split()
    assert query == "0"  # a query on the caller's thread: its team is given back
    assert bulk == "1"  # a document batch: the embedder's bulk thread, which stays, and no workers beside it
