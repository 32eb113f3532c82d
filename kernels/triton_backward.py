"""Triton backward of lora_linear (weight frozen).

    g  = dy B                 (M, R)  fp32        } one pass over dy: _dy_kernel
    dB = dy^T (u * S)         (N, R)              }   (dB accumulated with fp32 atomics)
    gs = (g * S).to(dtype)
    dx = dy W + gs A          (M, K)              the forward kernel, W and A read transposed
    dA = gs^T x               (R, K)              _da_kernel
    dS = g * u                (M, R) or summed to (1, R), only when requested

u is the fp32 x A^T saved by the forward (M x R), so nothing is recomputed.

With lora_input (xl, e.g. dropout(x)): u = xl A^T, dA = gs^T xl (the same _da_kernel reading
xl), dx = dy W (the forward kernel with its expand switched off), and d lora_input = gs A as
a torch mm: an (M, R) x (R, K) product (2MRK flops) bound by the write of its (M, K) output,
which folding it into the dx kernel as a second store would not save.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_forward
from .triton_config import bwd_da_config, bwd_dy_config, input_precision, interpreting


@triton.jit
def _dy_kernel(
    dy_ptr, b_ptr, us_ptr, g_ptr, db_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_usm, stride_usr,
    stride_gm, stride_gr, stride_dbn, stride_dbr,
    NEED_DB: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    us = tl.load(us_ptr + offs_m[:, None] * stride_usm + offs_r[None, :] * stride_usr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    if UPCAST:
        us = us.to(tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (DESIGN section 2)
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
        if NEED_DB:
            db = tl.dot(tl.trans(dy), us, input_precision=PRECISION)  # (BLOCK_N, BLOCK_R)
            tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                          db, mask=mask_n[:, None] & mask_r[None, :])
    tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr, g,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _da_kernel(
    gs_ptr, x_ptr, da_ptr,
    M, K, R,
    stride_gsm, stride_gsr, stride_xm, stride_xk, stride_dar, stride_dak,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_k = tl.program_id(0)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        gs_t = tl.load(gs_ptr + offs_r[:, None] * stride_gsr + offs_m[None, :] * stride_gsm,
                       mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            gs_t = gs_t.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(gs_t, x, acc, input_precision=PRECISION)
    tl.store(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak,
             acc.to(da_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])


def backward(dy, x, weight, lora_a, lora_b, scale, u, lora_input, output_mask):
    """(dx, d lora_a, d lora_b, d scale, d lora_input); entries not in output_mask (and d
    lora_input without lora_input) are empty tensors. With lora_input, x is not read."""
    need_dx, need_da, need_db, need_ds, need_dl = output_mask
    split = lora_input is not None
    dtype = x.dtype
    n, k = weight.shape
    r = lora_a.shape[0]
    dy2 = dy.reshape(-1, n)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    m = dy2.shape[0]
    upcast = interpreting() and dtype != torch.float32
    precision = input_precision(dtype)

    g = torch.empty((m, r), device=x.device, dtype=torch.float32)
    # us = u * S only feeds dB; without it the kernel gets placeholder pointers it never reads.
    us = (u * scale).to(dtype) if need_db else g
    db32 = torch.zeros((n, r), device=x.device, dtype=torch.float32) if need_db else g
    block_m, block_n, block_r, warps = bwd_dy_config(m, n, r, x.device)
    _dy_kernel[(triton.cdiv(m, block_m),)](
        dy2, lora_b, us, g, db32, m, n, r,
        dy2.stride(0), dy2.stride(1), lora_b.stride(0), lora_b.stride(1),
        us.stride(0), us.stride(1), g.stride(0), g.stride(1), db32.stride(0), db32.stride(1),
        NEED_DB=need_db, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps,
    )
    empty = x.new_empty(0)
    gs = (g * scale).to(dtype)
    dx = empty
    if need_dx:
        dx = triton_forward.input_grad(dy2, weight, lora_a, None if split else gs).view(x.shape)
    dl = torch.mm(gs, lora_a).view(x.shape) if split and need_dl else empty
    da = empty
    if need_da:
        x2 = (lora_input if split else x).reshape(-1, k)
        da = torch.empty((r, k), device=x.device, dtype=dtype)
        blk_r, blk_k, blk_m, warps = bwd_da_config(r, k, x.device)
        _da_kernel[(triton.cdiv(k, blk_k),)](
            gs, x2, da, m, k, r,
            gs.stride(0), gs.stride(1), x2.stride(0), x2.stride(1), da.stride(0), da.stride(1),
            UPCAST=upcast, PRECISION=precision,
            BLOCK_R=blk_r, BLOCK_K=blk_k, BLOCK_M=blk_m, num_warps=warps,
        )
    db = db32.to(dtype) if need_db else empty
    ds = scale.new_empty(0)
    if need_ds:
        ds = g * u
        if scale.shape[0] == 1 and ds.shape[0] != 1:
            ds = ds.sum(0, keepdim=True)
    return dx, da, db, ds, dl
