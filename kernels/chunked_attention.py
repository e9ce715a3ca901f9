"""RETRO's chunked cross-attention: the PyTorch reference (`chunked_cross_attention_ref`, padded
rows with a mask), its one-query-at-a-time definition, and the packed row layout the Triton
kernel (`chunked_attention_triton`) reads without padding (`pack_rows`).

Queries at consecutive positions `start .. start + T - 1` of a sequence cut into chunks of m
tokens. The query at position p reads the rows of chunk c(p) = (p + 1) // m - 1 (RETRO's causal
alignment: chunk u's neighbours are read from u's last token, position u*m + m - 1, up to the
token before the last of chunk u + 1); the first m - 1 positions read nothing. The rows of a chunk
are its encoded neighbours, `valid` marking the real ones (neighbours differ in number and
length); a query whose chunk has no valid row gets zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor


def chunk_read_by(position: int, chunk_tokens: int) -> int:
    """The chunk whose neighbours the query at `position` reads (-1: none)."""
    return (position + 1) // chunk_tokens - 1


def chunked_cross_attention_ref(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, start: int, chunk_tokens: int,
                                first_chunk: int, scale: float | None = None) -> Tensor:
    """q (B, H, T, dh): queries at positions start .. start + T - 1.
    k, v (B, G, H, L, dh): the rows of chunks first_chunk .. first_chunk + G - 1 (padded to L).
    valid (B, G, L) bool: which rows are real.
    -> (B, H, T, dh): each query's softmax attention over its chunk's valid rows; 0 for a query
    whose chunk is outside [first_chunk, first_chunk + G) or has no valid row."""
    B, H, T, dh = q.shape
    G, L, m = k.shape[1], k.shape[3], chunk_tokens
    out = q.new_zeros(B, H, T, dh)
    if G == 0 or T == 0:
        return out
    # Lay the queries out chunk by chunk: position p is slot (p - first_p) of the flat (G * m) layout,
    # where first_p = first_chunk * m + m - 1 is the first position that reads first_chunk.
    first_p = first_chunk * m + m - 1
    lo = max(start, first_p)  # first query that reads a chunk of this range
    hi = min(start + T, first_p + G * m)  # one past the last
    if hi <= lo:
        return out
    offset = lo - first_p
    qs = q[:, :, lo - start : hi - start]  # (B, H, n, dh)
    n = hi - lo
    qs = torch.nn.functional.pad(qs, (0, 0, offset, G * m - offset - n))  # (B, H, G*m, dh)
    qs = qs.view(B, H, G, m, dh).transpose(1, 2)  # (B, G, H, m, dh)
    scale = dh ** -0.5 if scale is None else scale
    scores = torch.matmul(qs, k.transpose(-1, -2)) * scale  # (B, G, H, m, L)
    # A finite floor, not -inf: a chunk without rows gives uniform weights (no NaN), zeroed below.
    scores = scores.masked_fill(~valid[:, :, None, None, :], torch.finfo(scores.dtype).min)
    y = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, G, H, m, dh)
    y = y * valid.any(-1)[:, :, None, None, None].to(y.dtype)
    y = y.transpose(1, 2).reshape(B, H, G * m, dh)[:, :, offset : offset + n]  # (B, H, n, dh)
    out[:, :, lo - start : hi - start] = y
    return out


def chunked_cross_attention_loop(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, start: int, chunk_tokens: int,
                                 first_chunk: int, scale: float | None = None) -> Tensor:
    """The same, one query at a time, straight from the definition (what the tests hold the
    layout above to)."""
    B, H, T, dh = q.shape
    G = k.shape[1]
    scale = dh ** -0.5 if scale is None else scale
    out = q.new_zeros(B, H, T, dh)
    for t in range(T):
        g = chunk_read_by(start + t, chunk_tokens) - first_chunk
        if not 0 <= g < G:
            continue
        for b in range(B):
            rows = valid[b, g]
            if not rows.any():
                continue
            s = (k[b, g][:, rows] @ q[b, :, t, :, None]).squeeze(-1) * scale  # (H, L')
            out[b, :, t] = (torch.softmax(s, dim=-1)[:, None, :] @ v[b, g][:, rows]).squeeze(1)
    return out


def pack_rows(k: Tensor, v: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Padded rows (B, G, H, L, dh) + valid (B, G, L) -> the valid rows only, (H, R, dh) each, in
    (batch, chunk, row) order, and offsets (B, G + 1) int32: chunk g of sequence b holds rows
    [offsets[b, g], offsets[b, g + 1]) (offsets[b, G] == offsets[b + 1, 0])."""
    B, G, H, L, dh = k.shape
    mask = valid.reshape(-1)  # (B*G*L,)
    kp = k.permute(2, 0, 1, 3, 4).reshape(H, B * G * L, dh)[:, mask]
    vp = v.permute(2, 0, 1, 3, 4).reshape(H, B * G * L, dh)[:, mask]
    counts = valid.sum(-1).reshape(-1).to(torch.int64)  # (B*G,)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    offsets = torch.cat([starts.view(B, G), ends.view(B, G)[:, -1:]], dim=1) if G else torch.zeros(B, 1, dtype=torch.int64)
    return kp.contiguous(), vp.contiguous(), offsets.to(torch.int32).to(k.device)
