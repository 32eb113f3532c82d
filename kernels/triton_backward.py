"""Triton backward of lora_linear (weight frozen).

    g  = dy B                 (M, R)  fp32        } one pass over dy: _dy_kernel
    dB = dy^T (u * S)         (N, R)              }
    gs = (g * S).to(dtype)
    dx = dy W + gs A          (M, K)              kernels/triton_gemm.py, W and A read transposed
    dA = gs^T x               (R, K)              _da_kernel
    dS = g * u                (M, R) or summed to (1, R), only when requested

u is the fp32 x A^T saved by the forward (M x R), so nothing is recomputed.

Filling the GPU (kernels/triton_schedule.py): the dy pass runs row blocks x slices of N, g
summed over the slices with fp32 atomics into a zeroed buffer, dB receiving one atomic add
per row block (M / BLOCK_M adds per element); the dA kernel runs column tiles of K x slices
of M, summed with fp32 atomics. Without the slices the dA grid had K / BLOCK_K programs (32 at
K = 4096, a quarter of an H100) while it streams all of x.

With in-op dropout (kernels/triton_dropout.py) the mask is regenerated, never loaded:
gs = g * S / (1 - p), dx = dy W (the GEMM kernel, its expand off) then dx += (gs A) ⊙ keep (one
masked pass, triton_dropout.masked_expand_plan), dA = gs^T (x ⊙ keep) (masked as _da_kernel loads
x).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_dropout, triton_gemm, triton_schedule
from .triton_config import (
    BwdConfig,
    aligned,
    arch_of,
    da_default,
    dy_default,
    input_precision,
    interpreter_bwd_config,
    interpreting,
    sm_count,
)
from .triton_dropout import InOpDropout, keep_mask
from .triton_launch import Launch


@triton.jit
def _dy_kernel(
    # pointers
    dy_ptr, b_ptr, us_ptr, g_ptr, db_ptr,
    # sizes
    M, N, R,
    # strides
    stride_dym, stride_dyn, stride_bn, stride_br, stride_usm, stride_usr,
    stride_gm, stride_gr, stride_dbn, stride_dbr,
    # modes
    NEED_DB: tl.constexpr, G_ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slices = tl.num_programs(1)
    col_tiles = tl.cdiv(N, BLOCK_N)
    tile_first = pid_n * col_tiles // slices
    tile_end = (pid_n + 1) * col_tiles // slices
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)[:, None]  # int64: M x N offsets can pass 2^31
    mask_m = offs_m < M
    mask_r = offs_r < R
    us = tl.load(us_ptr + offs_m[:, None] * stride_usm + offs_r[None, :] * stride_usr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    if UPCAST:
        us = us.to(tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for tile in range(tile_first, tile_end):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + rows * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (docs/ARCHITECTURE.md §1)
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
        if NEED_DB:
            db = tl.dot(tl.trans(dy), us, input_precision=PRECISION)  # (BLOCK_N, BLOCK_R)
            tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                          db, mask=mask_n[:, None] & mask_r[None, :])
    g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr
    if G_ATOMIC:  # slices of N add their part of g into the zeroed buffer
        tl.atomic_add(g_ptrs, g, mask=mask_m[:, None] & mask_r[None, :])
    else:
        tl.store(g_ptrs, g, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _da_kernel(
    # pointers
    gs_ptr, x_ptr, da_ptr, seed_ptr,
    # sizes
    M, K, R,
    # strides
    stride_gsm, stride_gsr, stride_xm, stride_xk, stride_dar, stride_dak,
    # in-op dropout: keep when (random >> 1) >= drop_threshold
    drop_threshold,
    # modes
    MASK_X: tl.constexpr,  # x under the in-op dropout mask
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    slices = tl.num_programs(1)
    row_blocks = tl.cdiv(M, BLOCK_M)
    block_first = pid_m * row_blocks // slices
    block_end = (pid_m + 1) * row_blocks // slices
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    # dA^T tile = x^T gs: the K tile is the dot's M side (>= 64, so Hopper's wgmma applies;
    # with gs^T x the rank, 16..64, would be M and the dot would fall back to mma.sync).
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    seed = 0
    if MASK_X:
        seed = tl.load(seed_ptr)
    for block in range(block_first, block_end):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        gs = tl.load(gs_ptr + offs_m[:, None] * stride_gsm + offs_r[None, :] * stride_gsr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
                    + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if MASK_X:
            x = tl.where(keep_mask(seed, offs_m, offs_k, drop_threshold), x, 0.0)
        if UPCAST:
            gs = gs.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(x), gs, acc, input_precision=PRECISION)
    tl.atomic_add(da_ptr + offs_k[:, None] * stride_dak + offs_r[None, :] * stride_dar, acc,
                  mask=mask_k[:, None] & mask_r[None, :])


def _facts(device: torch.device, r: int, n_aligned: bool, k_aligned: bool,
           dtype: torch.dtype) -> tuple[BwdConfig, BwdConfig, int]:
    if device.type != "cuda" or interpreting():
        cfg = interpreter_bwd_config(r)
        return cfg, cfg, 4
    arch = arch_of(device)
    return (dy_default(arch, r, n_aligned, dtype), da_default(arch, r, k_aligned, dtype),
            sm_count(device))


def dy_plan(dy2, lora_b, us, g, db32, *, need_db: bool, cfg: BwdConfig, sms: int) -> Launch:
    """The Launch of the dy pass; g (and db32) must be zeroed when the plan slices N."""
    m, n = dy2.shape
    r = lora_b.shape[1]
    sched = triton_schedule.dy_schedule(m, n, cfg.block_m, cfg.block_cols, sms)
    args = dict(
        dy_ptr=dy2, b_ptr=lora_b, us_ptr=us, g_ptr=g, db_ptr=db32, M=m, N=n, R=r,
        stride_dym=dy2.stride(0), stride_dyn=dy2.stride(1),
        stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1),
        stride_usm=us.stride(0), stride_usr=us.stride(1),
        stride_gm=g.stride(0), stride_gr=g.stride(1),
        stride_dbn=db32.stride(0), stride_dbr=db32.stride(1),
        NEED_DB=need_db, G_ATOMIC=sched.chunks > 1,
        UPCAST=interpreting() and dy2.dtype != torch.float32,
        PRECISION=input_precision(dy2.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_cols, BLOCK_R=cfg.block_r,
    )
    return Launch(_dy_kernel, (sched.row_blocks, sched.chunks), args, cfg.num_warps,
                  cfg.num_stages)


def da_plan(gs, x2, da32, *, cfg: BwdConfig, sms: int,
            dropout: InOpDropout | None = None) -> Launch:
    """The Launch of the dA kernel into the zeroed fp32 da32 (R x K); dropout: x is read under
    the in-op dropout mask."""
    m, k = x2.shape
    r = gs.shape[1]
    sched = triton_schedule.da_schedule(m, k, cfg.block_m, cfg.block_cols, sms)
    args = dict(
        gs_ptr=gs, x_ptr=x2, da_ptr=da32,
        seed_ptr=dropout.seed if dropout is not None else x2, M=m, K=k, R=r,
        stride_gsm=gs.stride(0), stride_gsr=gs.stride(1),
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_dar=da32.stride(0), stride_dak=da32.stride(1),
        drop_threshold=dropout.threshold if dropout is not None else 0,
        MASK_X=dropout is not None,
        UPCAST=interpreting() and x2.dtype != torch.float32,
        PRECISION=input_precision(x2.dtype),
        BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_cols, BLOCK_M=cfg.block_m,
    )
    return Launch(_da_kernel, (sched.col_tiles, sched.chunks), args, cfg.num_warps,
                  cfg.num_stages)


def backward(dy, x, weight, lora_a, lora_b, scale, u, output_mask,
             dropout: InOpDropout | None = None):
    """(dx, d lora_a, d lora_b, d scale); entries not in output_mask are empty tensors. With
    dropout (in-op), the mask is regenerated for dx's and dA's rank-R terms."""
    need_dx, need_da, need_db, need_ds = output_mask
    dtype = x.dtype
    n, k = weight.shape
    r = lora_a.shape[0]
    dy2 = dy.reshape(-1, n)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    m = dy2.shape[0]
    x_rows = x.reshape(-1, k)
    dy_cfg, da_cfg, sms = _facts(x.device, r, aligned(n, dy2.stride(0)),
                                 aligned(k, m, x_rows.stride(0)), dtype)

    g = torch.zeros((m, r), device=x.device, dtype=torch.float32)
    # us = u * S only feeds dB; without it the kernel gets placeholder pointers it never reads.
    us = (u * scale).to(dtype) if need_db else g
    db32 = torch.zeros((n, r), device=x.device, dtype=torch.float32) if need_db else g
    dy_plan(dy2, lora_b, us, g, db32, need_db=need_db, cfg=dy_cfg, sms=sms).run()
    empty = x.new_empty(0)
    gs = (g * scale if dropout is None else g * scale * dropout.scale).to(dtype)
    dx = empty
    if need_dx:
        fused_term = dropout is None  # gs A inside the dx GEMM's epilogue
        dx = triton_gemm.input_grad(dy2, weight, lora_a, gs if fused_term else None)
        if dropout is not None:
            triton_dropout.masked_expand_plan(dx, gs, lora_a, dropout).run()
        dx = dx.view(x.shape)
    da = empty
    if need_da:
        da32 = torch.zeros((r, k), device=x.device, dtype=torch.float32)
        da_plan(gs, x_rows, da32, cfg=da_cfg, sms=sms, dropout=dropout).run()
        da = da32.to(dtype)
    db = db32.to(dtype) if need_db else empty
    ds = scale.new_empty(0)
    if need_ds:
        ds = g * u
        if scale.shape[0] == 1 and ds.shape[0] != 1:
            ds = ds.sum(0, keepdim=True)
    return dx, da, db, ds
