"""The split forward (LoRAFusion's two kernels): the in-op dropout forward, and a measured
alternative in bench/op_gpu.py (provider two_gemm) without dropout, where the dispatcher uses
the single launch of kernels/triton_forward.py unless a GPU measurement says otherwise.

    launch 1 (_shrink_kernel):  u = x A^T (fp32, M x R), us = (u * S).to(x.dtype)
    launch 2 (kernels/triton_gemm.py, the GEMM + expand kernel):
                                y = x W^T + bias + us B^T

u is computed exactly once per row, at the price of a second pass over x (the shrink reads x,
the GEMM reads it again) and an (M, R) round trip through memory.

With in-op dropout (MASK_X) the shrink applies the Philox mask to its x tiles and scales u by
1 / (1 - p), as LoRAFusion fuses dropout into its shrink. The mask is generated per element
over the whole (BLOCK_M, BLOCK_K) tile at once (four 32-bit Philox words live per element):
inside the single-launch forward, next to its (BLOCK_M, BLOCK_N) accumulator, that spilled at
every dispatched sm_90a tile (the static gate), while the shrink has registers to spare.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_gemm, triton_launch
from .triton_config import input_precision, interpreting, operand_class, padded_rank
from .triton_dropout import InOpDropout, keep_mask


@triton.jit
def _shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, u_ptr, us_ptr, seed_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    stride_um, stride_ur, stride_usm, stride_usr,
    # in-op dropout: keep when (random >> 1) >= drop_threshold; u scaled by drop_scale
    drop_threshold, drop_scale,
    # modes
    MASK_X: tl.constexpr,  # x under the in-op dropout mask
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_mr = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    seed = 0
    if MASK_X:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
                    + kk[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + kk[:, None] * stride_ak,
                      mask=(kk[:, None] < K) & (offs_r[None, :] < R), other=0.0)
        if MASK_X:
            x = tl.where(keep_mask(seed, offs_m, kk, drop_threshold), x, 0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (docs/ARCHITECTURE.md §1)
            x = x.to(tl.float32)
            a_t = a_t.to(tl.float32)
        u = tl.dot(x, a_t, u, input_precision=PRECISION)
    if MASK_X:
        u = u * drop_scale
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=mask_mr, other=0.0)
    tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u, mask=mask_mr)
    tl.store(us_ptr + offs_m[:, None] * stride_usm + offs_r[None, :] * stride_usr,
             (u * s).to(us_ptr.dtype.element_ty), mask=mask_mr)


def shrink_plan(x2, lora_a, scale, u, us, block_m: int = 64, block_k: int = 128,
                dropout: InOpDropout | None = None):
    """The Launch of the shrink kernel (u, us allocated); dropout: x under the mask."""
    m, k = x2.shape
    r = lora_a.shape[0]
    if dropout is not None:
        block_k = 32  # the mask's Philox state: 4 words per element of the x tile
    elif operand_class(x2.dtype) == "fp32":
        block_k = 32  # FMA dots hold the x tile in registers: 128 deep spilled 5 KB on sm_80
    if interpreting():
        block_m, block_k = 32, 32
    elif k % 16 or x2.stride(0) % 16:  # unaligned rows: 64-row tiles spill at R = 48
        block_m = 32
    args = dict(
        x_ptr=x2, a_ptr=lora_a, s_ptr=scale, u_ptr=u, us_ptr=us,
        seed_ptr=dropout.seed if dropout is not None else x2, M=m, K=k, R=r,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1),
        stride_sm=0 if scale.shape[0] == 1 else scale.stride(0), stride_sr=scale.stride(1),
        stride_um=u.stride(0), stride_ur=u.stride(1),
        stride_usm=us.stride(0), stride_usr=us.stride(1),
        drop_threshold=dropout.threshold if dropout is not None else 0,
        drop_scale=dropout.scale if dropout is not None else 1.0,
        MASK_X=dropout is not None,
        UPCAST=interpreting() and x2.dtype != torch.float32,
        PRECISION=input_precision(x2.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=padded_rank(r),
    )
    return triton_launch.Launch(_shrink_kernel, (triton.cdiv(m, block_m),), args,
                                 num_warps=4, num_stages=3)


def forward(x, weight, bias, lora_a, lora_b, scale, dropout: InOpDropout | None = None):
    """(y, u) of lora_linear through the two launches: the in-op dropout forward, and the
    benchmark's two_gemm provider."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, r = x2.shape[0], lora_a.shape[0]
    u = torch.empty((m, r), device=x.device, dtype=torch.float32)
    us = torch.empty((m, r), device=x.device, dtype=x.dtype)
    shrink_plan(x2, lora_a, scale, u, us, dropout=dropout).run()
    y = triton_gemm.expand_into_gemm(x2, weight, bias, lora_b, us)
    return y.view(*x.shape[:-1], weight.shape[0]), u
