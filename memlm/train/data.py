"""Training examples from a token stream, and the cache of frozen lower-layer states.

`TokenWindows` cuts a split's token stream into non-overlapping windows of seq + 1 tokens (window
i is tokens[i*seq : i*seq + seq + 1]; documents run across windows, separated by <|endoftext|>).
`WindowOrder` says which window comes at each data position: epoch e is a permutation seeded by
(seed, e), so the whole order is a pure function of (seed, position) and resuming needs only the
position. `HiddenStateCache` keeps, for each window, the frozen model's states entering the
adapter's first layer in a disk-backed array, computed once: a (seq, dim) fp32 row per window,
1.2 MB at 512 x 576, so it is meant for the windows a run actually revisits (`train_windows`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from memlm.model.llama import Llama
from memlm.train.adapter import lower_hidden


class TokenWindows:
    def __init__(self, tokens: np.ndarray, seq: int):
        if len(tokens) < seq + 1:
            raise ValueError(f"a split of {len(tokens)} tokens holds no window of seq={seq} + 1 tokens")
        self.tokens, self.seq = tokens, seq
        self.n = (len(tokens) - 1) // seq

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        """idx (B,) -> tokens (B, seq + 1) as int64."""
        return np.stack([np.asarray(self.tokens[i * self.seq : i * self.seq + self.seq + 1], np.int64) for i in idx])


class WindowOrder:
    """Window index at each data position: an endless sequence of seeded permutations of `pool`
    (all windows, or a fixed seeded subset of `limit` of them), each pool window once per epoch
    unless `repeated` gave it more."""

    def __init__(self, n_windows: int, seed: int, limit: int = 0):
        self.seed = seed
        pool = np.arange(n_windows)
        if 0 < limit < n_windows:
            pool = np.sort(np.random.default_rng([seed, 2**31 - 1]).permutation(n_windows)[:limit])
        self.pool = pool
        self.sequence = pool  # what an epoch permutes
        self._epochs: dict[int, np.ndarray] = {}

    def repeated(self, repeats: np.ndarray) -> "WindowOrder":
        """This order with pool window i seen repeats[i] (>= 1) times per epoch."""
        repeats = np.asarray(repeats, np.int64)
        if repeats.shape != self.pool.shape or (repeats < 1).any():
            raise ValueError(f"repeats must be {len(self.pool)} counts >= 1, one per pool window")
        out = WindowOrder.__new__(WindowOrder)
        out.seed, out.pool, out._epochs = self.seed, self.pool, {}
        out.sequence = np.repeat(self.pool, repeats)
        return out

    def key(self) -> str:
        """What the order is made of (a checkpoint resumes only the same order)."""
        return hashlib.sha1(np.ascontiguousarray(self.sequence, np.int64).tobytes()).hexdigest()[:16]

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._epochs:
            self._epochs = {e: self.sequence[np.random.default_rng([self.seed, e]).permutation(len(self.sequence))]}
        return self._epochs[e]

    def take(self, position: int, count: int) -> np.ndarray:
        """The window indices at positions [position, position + count)."""
        n = len(self.sequence)
        return np.array([self.epoch(p // n)[p % n] for p in range(position, position + count)], np.int64)


class HiddenStateCache:
    """States entering layer `layer` of the frozen `model` for each window of `windows`, (seq, D)
    fp32 per window, filled on demand in batches of `compute_batch` and kept in FOLDER/states.npy
    (a sparse memmap of every window's slot) with FOLDER/filled.npy marking what is there.

    Durable order: states are written and flushed first, then filled.npy is replaced (tmp +
    os.replace), so a crash can lose work but never mark a slot that was not written. The folder
    must be keyed by everything the states depend on (base weights, layer, seq, the split's tokens);
    `meta.json` records that key and a mismatching folder is refused.
    """

    def __init__(self, folder: str | Path, model: Llama, windows: TokenWindows, layer: int, key: dict,
                 compute_batch: int = 4):
        self.folder, self.model, self.windows, self.layer = Path(folder), model, windows, layer
        self.compute_batch = compute_batch
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"layer": layer, "seq": windows.seq, "windows": len(windows), "dim": model.config.dim, **key}
        meta_path = self.folder / "meta.json"
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old != meta:
                raise ValueError(f"hidden-state cache {self.folder} was built for {old}, not {meta}: remove it")
        else:
            meta_path.write_text(json.dumps(meta))
        shape = (len(windows), windows.seq, model.config.dim)
        path = self.folder / "states.npy"
        mode = "r+" if path.is_file() else "w+"
        self.states = np.lib.format.open_memmap(path, mode=mode, dtype=np.float32, shape=None if mode == "r+" else shape)
        filled_path = self.folder / "filled.npy"
        self.filled = np.load(filled_path) if filled_path.is_file() else np.zeros(len(windows), bool)
        self.computed = 0  # windows computed by this process (the rest were read from disk)

    def _compute(self, idx: np.ndarray) -> None:
        device = self.model.tok_embeddings.weight.device
        for lo in range(0, len(idx), self.compute_batch):
            part = idx[lo : lo + self.compute_batch]
            tokens = torch.from_numpy(self.windows[part][:, :-1]).to(device)  # (b, seq)
            with torch.no_grad():
                h = lower_hidden(self.model, tokens, self.layer)  # (b, seq, D)
            self.states[part] = h.float().cpu().numpy()
        self.states.flush()
        self.filled[idx] = True
        tmp = self.folder / "filled.tmp.npy"
        np.save(tmp, self.filled)
        os.replace(tmp, self.folder / "filled.npy")
        self.computed += len(idx)

    def fill(self, idx: np.ndarray) -> None:
        """Compute the states of those of idx not cached yet."""
        idx = np.asarray(idx, np.int64)
        missing = np.unique(idx[~self.filled[idx]])
        if len(missing):
            self._compute(missing)

    def get(self, idx: np.ndarray) -> Tensor:
        """idx (B,) -> states (B, seq, D) fp32 on CPU, computing the missing ones first."""
        self.fill(idx)
        return torch.from_numpy(np.ascontiguousarray(self.states[np.asarray(idx, np.int64)]))


def corpus_key(tokens: np.ndarray) -> str:
    """A short hash of a token stream (for cache keys): sha1 of its bytes."""
    return hashlib.sha1(np.ascontiguousarray(tokens).view(np.uint8)).hexdigest()[:16]


def default_hidden_cache_dir(cache_dir: Optional[Path] = None) -> Path:
    from memlm.models.loading import default_cache_dir

    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "hidden"
