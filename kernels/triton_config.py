"""Tile configurations of the Triton kernels, and the facts about the run (interpreter or GPU,
tf32 allowed or not) that the launchers need.

GPU tiles come from a small table keyed on (M, N, K, R) buckets. They are starting points
written from the kernel's structure, NOT tuned on hardware: no GPU has been lent to this
project yet (see README). Under TRITON_INTERPRET=1 one fixed config is used (autotuning and
timing do not work without a GPU).
"""
from __future__ import annotations

import dataclasses
import os

import torch


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Tiles of the forward / dx kernel. block_r is R padded to a power of two >= 16."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1

    def with_split_k(self, split_k: int) -> "FwdConfig":
        return dataclasses.replace(self, split_k=split_k)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: tf32 for fp32 only where the caller's matmul precision allows
    it (torch.backends.cuda.matmul.allow_tf32); 16-bit dtypes ignore it."""
    if interpreting():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def padded_rank(r: int) -> int:
    """R rounded up to a power of two, at least 16: the smallest dot dimension on GPU."""
    return max(16, 1 << max(r - 1, 0).bit_length())


# Split-K is used for decode-sized M when the plain grid leaves most SMs idle.
DECODE_MAX_M = 64


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fwd_config(m: int, n: int, k: int, r: int, device: torch.device,
               split_k: int | None = None) -> FwdConfig:
    """Tiles for a (M, N, K, R) problem: prefill tiles, or small-M tiles plus split-K."""
    block_r = padded_rank(r)
    if device.type != "cuda" or interpreting():
        return FwdConfig(32, 32, 32, block_r, group_m=4, num_warps=4, num_stages=1,
                         split_k=split_k or 1)
    if m > DECODE_MAX_M:
        block_n = 256 if n >= 4096 and block_r <= 32 else 128
        return FwdConfig(128, block_n, 64, block_r, group_m=8, num_warps=8, num_stages=3,
                         split_k=split_k or 1)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n, block_k = 64, 128
    if split_k is None:
        tiles = -(-m // block_m) * -(-n // block_n)
        k_blocks = -(-k // block_k)
        split_k = max(1, min(k_blocks // 4, -(-2 * _sm_count(device) // tiles)))
    return FwdConfig(block_m, block_n, block_k, block_r, group_m=1, num_warps=4,
                     num_stages=4, split_k=split_k)


def bwd_dy_config(m: int, n: int, r: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R, num_warps) of the kernel reading dy (g and dB)."""
    block_r = padded_rank(r)
    if device.type != "cuda" or interpreting():
        return 32, 32, block_r, 4
    return 64, 128, block_r, 4


def bwd_da_config(r: int, k: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_M, num_warps) of the d lora_a kernel."""
    block_r = padded_rank(r)
    if device.type != "cuda" or interpreting():
        return block_r, 32, 32, 4
    return block_r, 128, 64, 4
