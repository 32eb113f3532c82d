"""How the Triton kernels spread work over a GPU: pure arithmetic on tile counts, no Triton, so
the dispatcher, the static report (bench/gpu_static.py) and the tests share one definition.

The forward's schedule (kernels/triton_forward.py). A row block of BLOCK_M rows is split into
``chunks`` runs of consecutive column tiles; one program owns one run. It computes
u = x A^T (fp32, BLOCK_M x BLOCK_R) in the K loop of its first tile, next to the base dot, and
reuses u * S for the expand of every later tile of its run. u is therefore computed
``chunks`` times per row block instead of once per column tile, and the tensor-core work
beyond the plain GEMM that a single shrink per row block cannot avoid is

    extra_mma_frac = (chunks - 1) * BLOCK_R / (col_tiles * BLOCK_N)

(the per-tile schedule it replaces has chunks = col_tiles: about BLOCK_R / BLOCK_N, 12.5 % at
R = 32, BLOCK_N = 256). ``chunks`` is the smallest number of runs that fills the SMs best
(fewest waves x tiles per program), capped so that extra_mma_frac stays within
EXTRA_MMA_BUDGET.
"""
from __future__ import annotations

import dataclasses

# Multiprocessors per target of the static report; at run time the device is asked.
SMS = {"sm_80": 108, "sm_90a": 132, "sm_100a": 148}
# Shared memory one program may use (opt-in maximum per block), bytes.
SMEM_LIMIT = {"sm_80": 166912, "sm_90a": 232448, "sm_100a": 232448}
# Most recompute of u the forward may do, as a fraction of the base GEMM's tensor-core work.
EXTRA_MMA_BUDGET = 0.02


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One launch's grid and its tensor-core work relative to the plain GEMM."""

    programs: int
    chunks: int            # runs of column tiles per row block (forward), or split factor
    row_blocks: int
    col_tiles: int
    extra_mma_frac: float  # recomputed shrink work / base GEMM work, from the tiles


def recompute_frac(shrinks_per_row_block: int, col_tiles: int, block_n: int,
                   block_r: int) -> float:
    """Tensor-core work of the u recomputes beyond one per row block, over the base GEMM's."""
    return (shrinks_per_row_block - 1) * block_r / (col_tiles * block_n)


def forward_schedule(m: int, n: int, block_m: int, block_n: int, block_r: int, sms: int,
                     computes_u: bool, budget: float = EXTRA_MMA_BUDGET) -> Schedule:
    """Grid of the chunked forward, and of the GEMM + expand kernel (kernels/triton_gemm.py:
    dx and the split's GEMM), which computes no u and so has no budget."""
    row_blocks, col_tiles = cdiv(m, block_m), cdiv(n, block_n)
    max_chunks = col_tiles
    if computes_u:
        # (c - 1) * BLOCK_R / (col_tiles * BLOCK_N) <= budget; a tiny epsilon keeps exact
        # boundaries (e.g. 2 % exactly) on the allowed side of float rounding.
        max_chunks = min(col_tiles, 1 + int(budget * col_tiles * block_n / block_r + 1e-9))
    chunks = _best_chunks(row_blocks, col_tiles, max_chunks, sms)
    extra = recompute_frac(chunks, col_tiles, block_n, block_r) if computes_u else 0.0
    return Schedule(row_blocks * chunks, chunks, row_blocks, col_tiles, extra)


def _best_chunks(row_blocks: int, col_tiles: int, max_chunks: int, sms: int) -> int:
    """Fewest runs per row block whose makespan (waves x tiles per program) is within 10 % of
    the best: fewer programs mean fewer recomputes of u and fewer partial sums."""
    options = range(1, max(1, max_chunks) + 1)
    makespan = {c: cdiv(row_blocks * c, sms) * cdiv(col_tiles, c) for c in options}
    best = min(makespan.values())
    return min(c for c in options if makespan[c] <= 1.1 * best)


def pertile_schedule(m: int, n: int, block_m: int, block_n: int, block_r: int) -> Schedule:
    """The previous forward (kept as a measured alternative): one program per output tile,
    each recomputing u for its row block."""
    row_blocks, col_tiles = cdiv(m, block_m), cdiv(n, block_n)
    extra = recompute_frac(col_tiles, col_tiles, block_n, block_r)
    return Schedule(row_blocks * col_tiles, col_tiles, row_blocks, col_tiles, extra)


def decode_schedule(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int,
                    block_r: int, sms: int) -> Schedule:
    """Split-K decode (M <= DECODE_MAX_M): a (column tile, K slice) grid. Each column tile
    recomputes u over its slices (decode reads W from memory; the extra dots are free there)."""
    row_blocks, col_tiles = cdiv(m, block_m), cdiv(n, block_n)
    k_blocks = cdiv(k, block_k)
    tiles = row_blocks * col_tiles
    # Enough slices to give every SM about two programs, keeping >= 4 K blocks per slice.
    split = max(1, min(k_blocks // 4, cdiv(2 * sms, tiles)))
    extra = recompute_frac(col_tiles, col_tiles, block_n, block_r)
    return Schedule(tiles * split, split, row_blocks, col_tiles, extra)


def dy_schedule(m: int, n: int, block_m: int, block_n: int, sms: int) -> Schedule:
    """The backward's pass over dy (g = dy B, dB = dy^T us): row blocks x slices of N. g is
    summed over the slices with fp32 atomics; dB gets one atomic add per row block."""
    row_blocks, col_tiles = cdiv(m, block_m), cdiv(n, block_n)
    split = _best_chunks(row_blocks, col_tiles, col_tiles, sms)
    return Schedule(row_blocks * split, split, row_blocks, col_tiles, 0.0)


def da_schedule(m: int, k: int, block_m: int, block_k: int, sms: int) -> Schedule:
    """d lora_a = gs^T x: column tiles of K x slices of M, summed with fp32 atomics."""
    row_blocks, col_tiles = cdiv(m, block_m), cdiv(k, block_k)
    split = _best_chunks(col_tiles, row_blocks, row_blocks, sms)
    return Schedule(col_tiles * split, split, row_blocks, col_tiles, 0.0)
