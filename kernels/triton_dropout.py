"""In-op LoRA dropout for the Triton kernels: the keep mask of the native CPU path
(kernels/cpu/dropout.h), generated per tile from the seed and never stored.

    (r0, r1, r2, r3) = Philox4x32-10(counter = (k, m // 4, 0, 0), key = seed)
    keep[m, k]       = (r_{m % 4} >> 1) >= floor(p * 2^31)

``tl.philox`` is the same Philox4x32-10 as ATen's engine and the C++ path (constants, round
function, key schedule), so a (seed, shape) gives the same mask on CPU and on GPU; the
interpreter tests compare the two bit for bit. Each element computes the whole Philox block
and keeps its row's word: 4x the minimum of random work, in exchange for no cross-lane
shuffles (the CPU path uses all four words).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, offs_m, offs_k, threshold):
    """keep (BLOCK_M, BLOCK_K) bool for rows offs_m and columns offs_k of the (M, K) input."""
    zero = (offs_m[:, None] * 0 + offs_k[None, :] * 0).to(tl.uint32)
    counter_k = zero + offs_k[None, :].to(tl.uint32)
    counter_group = zero + (offs_m[:, None] // 4).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, counter_k, counter_group, zero, zero)
    word = offs_m[:, None] % 4
    r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return (r >> 1).to(tl.int32) >= threshold  # both < 2^31: signedness does not matter


@dataclasses.dataclass(frozen=True)
class InOpDropout:
    """The op's (dropout_p, dropout_seed) as the kernels take them."""

    p: float
    seed: torch.Tensor  # int64, one element, on the device of x

    @property
    def threshold(self) -> int:
        """floor(p * 2^31): an element is kept when its random word >> 1 is at least this."""
        return int(self.p * 2147483648.0)

    @property
    def scale(self) -> float:
        """1 / (1 - p), applied on the rank-R side (u, gs)."""
        return 1.0 / (1.0 - self.p)


def from_op_args(dropout_p: float, dropout_seed) -> InOpDropout | None:
    """None when dropout is off (p == 0), else the kernels' description of it."""
    if dropout_p <= 0:
        return None
    return InOpDropout(float(dropout_p), dropout_seed.reshape(1))
