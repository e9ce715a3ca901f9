"""Splitting document text into fixed-size chunks of language-model tokens (RETRO's 64).

A chunk is `chunk_tokens` consecutive tokens of the document (the last one may be shorter) plus
the exact character span of the source text they came from. Spans are contiguous: chunk 0 starts
at character 0, the last chunk ends at `len(text)`, and with `overlap=0` chunk i ends where chunk
i+1 starts, so concatenating the chunk texts reproduces the document exactly (whitespace between
tokens goes to the chunk on its left).

Limits: boundaries are placed at the start offset of the first token of the next chunk. A byte-level
BPE can split one character (an emoji, say) over several tokens; when a chunk boundary falls
inside such a run, the character's text lands in the next chunk while some of its token ids are in
this one. Token ids are always exact; only the text span is rounded to whole characters.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from memlm.errors import InvalidArgument
from memlm.index.types import Chunk


class Chunker:
    """Chunks text with a Hugging Face fast tokenizer (no special tokens added)."""

    def __init__(self, tokenizer: Any, chunk_tokens: int = 64, overlap: int = 0) -> None:
        if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
            raise InvalidArgument(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        if not isinstance(overlap, int) or not 0 <= overlap < chunk_tokens:
            raise InvalidArgument(
                f"chunk overlap must be an integer in [0, chunk_tokens={chunk_tokens}), got {overlap!r}"
            )
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise InvalidArgument(
                f"a fast (Rust-backed) Hugging Face tokenizer is needed for offsets, got {type(tokenizer).__name__}"
            )
        # A private copy of the Rust tokenizer: the transformers wrapper mutates truncation and
        # padding on its backend per call, which both races across threads ("Already borrowed")
        # and could silently truncate our documents if someone else set truncation on it.
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._lock = threading.Lock()  # encode() is documented thread-safe; the lock is cheap insurance
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        with self._lock:
            enc = self._tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text)[0])

    def chunk(self, text: str) -> list[Chunk]:
        """Return the chunks of `text` in order; an empty text has none."""
        ids, offsets = self._encode(text)
        n = len(ids)
        if n == 0:
            return []
        # boundary[t] = character where token t's chunk would start; boundary[n] = len(text).
        # The running maximum keeps boundaries monotone where offsets of a split character
        # overlap (e.g. (5,7), (6,7), (6,7) for " 👋").
        starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=n)
        boundary = np.empty(n + 1, dtype=np.int64)
        boundary[:n] = np.maximum.accumulate(starts)
        boundary[0] = 0
        boundary[n] = len(text)
        boundary = np.minimum(boundary, len(text))

        step = self.chunk_tokens - self.overlap
        chunks: list[Chunk] = []
        first = 0
        while True:
            last = min(first + self.chunk_tokens, n)  # exclusive token index
            start, end = int(boundary[first]), int(boundary[last])
            chunks.append(Chunk(text=text[start:end], token_ids=tuple(ids[first:last]), start=start, end=end))
            if last >= n:
                break
            first += step
        return chunks
