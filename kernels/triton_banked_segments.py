"""The row order and block table of a banked call (kernels/triton_banked.py reads them).

A segment is the rows sharing one whole index tuple (one client), in call order. The kernels
need each program's rows to share one tuple, so the rows are grouped once on the host side of
the launch:

    key[m]  = index[m] read as digits in base S  (one int64 per row; unique and sortable like
              the tuple; torch.unique over the (M, B) rows where S^B passes 2^62)
    order   = argsort(key, stable)               rows grouped by segment, call order within
    counts  = unique_consecutive(key[order])     rows per segment
    table   = one (start, rows, local) per block of up to BLOCK_M rows of one segment: its first
              position in ``order``, its row count, its first row's number within the segment
              (the in-op dropout mask numbers rows from 0 per segment)

Cost: a handful of small torch ops on M int64 keys (the sort dominates: M log M, nothing next
to the GEMM at prefill), one device-to-host copy of the per-segment counts (a stream sync:
the grid's size must be known on the host; the index check before it syncs too), the table
built with NumPy and copied back (3 int32 per block). The backward builds it again from the
saved index (one more sort and sync) rather than saving it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The grouping of one call: ``order`` (M,) int32 row ids grouped by segment, ``table``
    (blocks, 3) int32 rows of (start in order, rows, segment-local number of the first)."""

    order: torch.Tensor
    table: torch.Tensor
    segments: int

    @property
    def count(self) -> int:
        return self.table.shape[0]


def row_keys(index: torch.Tensor, adapters: int) -> torch.Tensor:
    """One int64 per row, equal for equal index tuples and sorted like them."""
    branches = index.shape[1]
    if branches * math.log2(max(adapters, 2)) > 62:
        return torch.unique(index, dim=0, return_inverse=True)[1]
    key = index[:, 0].clone()
    for b in range(1, branches):
        key = key * adapters + index[:, b]
    return key


def _shared_stream_error(adapter: int) -> ValueError:
    return ValueError(f"lora_linear_banked: under in-op dropout every row whose last branch "
                      f"uses adapter {adapter} must use the same adapters in every branch "
                      f"(one client, one dropout stream)")


def bank_blocks(index: torch.Tensor, adapters: int, block_m: int, dropout: bool) -> Blocks:
    """The row order and block table of ``index`` (M, B) for blocks of ``block_m`` rows.
    Under dropout two segments may not share a last adapter (one seed stream each)."""
    m = index.shape[0]
    device = index.device
    if m == 0:
        return Blocks(torch.zeros(0, dtype=torch.int32, device=device),
                      torch.zeros((0, 3), dtype=torch.int32, device=device), 0)
    key = row_keys(index, adapters)
    order = torch.argsort(key, stable=True)
    counts = torch.unique_consecutive(key[order], return_counts=True)[1]
    starts = torch.cumsum(counts, 0) - counts
    lasts = index[order[starts], -1]
    host = torch.stack([counts, starts, lasts], 1).cpu().numpy()  # the one sync
    counts_h, starts_h, lasts_h = host[:, 0], host[:, 1], host[:, 2]
    if dropout and len(np.unique(lasts_h)) != len(lasts_h):
        values, seen = np.unique(lasts_h, return_counts=True)
        raise _shared_stream_error(int(values[seen > 1][0]))
    table = block_table(counts_h, starts_h, block_m)
    return Blocks(order.to(torch.int32), torch.from_numpy(table).to(device), len(counts_h))


def block_table(counts: np.ndarray, starts: np.ndarray, block_m: int) -> np.ndarray:
    """(blocks, 3) int32: (start, rows, local) of every block of ``block_m`` rows of each
    segment (``counts`` rows from position ``starts`` of the row order)."""
    per_segment = -(-counts // block_m)
    segment = np.repeat(np.arange(len(counts)), per_segment)
    first_block = np.cumsum(per_segment) - per_segment
    local = (np.arange(len(segment)) - first_block[segment]) * block_m
    rows = np.minimum(counts[segment] - local, block_m)
    return np.stack([starts[segment] + local, rows, local], 1).astype(np.int32)


def even_blocks(m: int, clients: int, block_m: int, device="meta") -> Blocks:
    """A stand-in grouping of M rows in ``clients`` equal segments, on ``device`` (the static
    report's launches: the grid's size, without an index to sort)."""
    counts = np.full(clients, m // clients) + (np.arange(clients) < m % clients)
    counts = counts[counts > 0]
    table = block_table(counts, np.cumsum(counts) - counts, block_m)
    return Blocks(torch.empty(m, dtype=torch.int32, device=device),
                  torch.empty(table.shape, dtype=torch.int32, device=device), len(counts))
