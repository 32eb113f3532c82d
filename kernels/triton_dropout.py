"""In-op LoRA dropout for the Triton kernels: the keep mask of the native CPU path
(kernels/cpu/dropout.h), generated per tile from the seed and never stored.

Where it is applied (each place regenerates it):
- forward: the split forward's shrink masks its x tiles (kernels/triton_split.py);
- dx: dy W from the GEMM kernel (kernels/triton_gemm.py, its expand off), then
  ``masked_expand_plan``: dx += (gs A) ⊙ keep;
- dA: _da_kernel masks its x tiles (kernels/triton_backward.py).

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

from .triton_config import input_precision, interpreting, padded_rank


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


@triton.jit
def _masked_expand_add_kernel(
    # pointers
    out_ptr, gs_ptr, a_ptr, seed_ptr,
    # sizes (out is M x K; the rank-R term is gs (M x R) times A (R x K))
    M, K, R,
    # strides
    stride_om, stride_ok, stride_gm, stride_gr, stride_ar, stride_ak,
    # keep when (random >> 1) >= drop_threshold
    drop_threshold,
    # modes
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_k, mask_r = offs_m < M, offs_k < K, offs_r < R
    gs = tl.load(gs_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong (docs/ARCHITECTURE.md §1)
        gs = gs.to(tl.float32)
        a = a.to(tl.float32)
    term = tl.dot(gs, a, input_precision=PRECISION)
    term = tl.where(keep_mask(tl.load(seed_ptr), offs_m, offs_k, drop_threshold), term, 0.0)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :] * stride_ok
    io_mask = mask_m[:, None] & mask_k[None, :]
    out = tl.load(ptrs, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (out + term).to(out_ptr.dtype.element_ty), mask=io_mask)


def masked_expand_plan(out, gs, lora_a, dropout: InOpDropout, block_m: int = 64,
                       block_k: int = 64):
    """The Launch of ``out += (gs A) ⊙ keep`` (dx's rank-R term under the dropout mask).
    8 warps: at 4 the 64 x 64 tile spills on sm_90a at R = 48 (255 registers; 97 with 8)."""
    from .triton_launch import Launch
    m, k = out.shape
    r = lora_a.shape[0]
    if interpreting():
        block_m, block_k = 32, 32
    args = dict(
        out_ptr=out, gs_ptr=gs, a_ptr=lora_a, seed_ptr=dropout.seed, M=m, K=k, R=r,
        stride_om=out.stride(0), stride_ok=out.stride(1),
        stride_gm=gs.stride(0), stride_gr=gs.stride(1),
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1),
        drop_threshold=dropout.threshold,
        UPCAST=interpreting() and out.dtype != torch.float32,
        PRECISION=input_precision(out.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=padded_rank(r),
    )
    return Launch(_masked_expand_add_kernel, (triton.cdiv(m, block_m), triton.cdiv(k, block_k)),
                  args, num_warps=8, num_stages=2)
