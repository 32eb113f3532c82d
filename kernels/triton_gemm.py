"""Triton GEMM with a given rank-R operand: one launch of

    out[m, n] = sum_k x[m, k] W'[k, n] + bias[n] + sum_r us[m, r] B'[n, r]

for the two jobs that have the rank-R operand already (no u to compute):
- the backward's dx = dy W + gs A: x = dy, W' = W read reduction-major (W_T: the op's W is
  (N_op, K_op), the reduction runs over N_op), B' = A^T, us = gs; with EXPAND off, dx = dy W
  alone (the in-op dropout backward adds its masked rank-R term in its own pass);
- the split forward's second launch (kernels/triton_split.py): y = x W^T + bias + us B^T.

It is the forward kernel's tile loop and epilogue (kernels/triton_tiles.py) without the A branch,
its run of column tiles per program scheduled the same way (kernels/triton_schedule.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_schedule
from .triton_autotune import run_tuned
from .triton_config import (
    FwdConfig,
    aligned,
    arch_of,
    gemm_default,
    input_precision,
    interpreting,
    sm_count,
)
from .triton_launch import Launch, device_facts, m_bucket, tma_allowed
from .triton_tiles import tile_epilogue, tile_k_loop


@triton.jit(do_not_specialize=["m_bucket"])  # a key for the autotuner, not a compile input
def _gemm_expand_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, b_ptr, us_ptr, y_ptr,
    # sizes (y is M x N, the reduction runs over K; R real rank columns of us)
    M, N, K, R,
    # strides (W' and B' through theirs: stride_wn over output columns, stride_wk over K)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br,
    stride_usm, stride_usr, stride_ym, stride_yn,
    # autotune key only: the M bucket (the body never reads it)
    m_bucket,
    # modes
    HAS_BIAS: tl.constexpr,     # add bias[n]
    EXPAND: tl.constexpr,       # add the rank-R term us B'^T
    USE_TMA: tl.constexpr,      # x and W' through tensor descriptors
    W_T: tl.constexpr,          # W' is stored reduction-major (K x N): dx reads the op's W so
    UPCAST: tl.constexpr,       # interpreter only: 16-bit tiles to fp32 before each dot
    PRECISION: tl.constexpr,    # tl.dot input precision (tf32 / ieee)
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # The forward kernel's program -> (row block, run of column tiles) mapping, written out
    # again: as a shared jit helper it tipped the fp32 (FMA) dx tile on sm_90a into an 8 B
    # spill (static gate, Triton 3.9, 2026-12-07).
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(M, BLOCK_M)
    col_tiles = tl.cdiv(N, BLOCK_N)
    chunks = tl.num_programs(0) // row_blocks
    row_block = pid // chunks
    chunk = pid % chunks
    off_m = row_block * BLOCK_M
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)

    if USE_TMA:
        x_src = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                          block_shape=[BLOCK_M, BLOCK_K])
        if W_T:
            w_src = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_wk, 1],
                                              block_shape=[BLOCK_K, BLOCK_N])
        else:
            w_src = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                              block_shape=[BLOCK_N, BLOCK_K])
    else:
        x_src, w_src = x_ptr, w_ptr

    us = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if EXPAND:
        us = tl.load(us_ptr + offs_m[:, None] * stride_usm + offs_r[None, :] * stride_usr,
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        if UPCAST:
            us = us.to(tl.float32)

    for tile in range(chunk * col_tiles // chunks, (chunk + 1) * col_tiles // chunks):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc, _ = tile_k_loop(acc, us, x_src, w_src, w_src, off_m, tile * BLOCK_N, 0, K,
                             M, N, R, stride_xm, stride_xk, stride_wn, stride_wk, 0, 0,
                             False, USE_TMA, W_T, UPCAST, PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        tile_epilogue(acc, us, b_ptr, bias_ptr, y_ptr, off_m, tile * BLOCK_N, M, N, R,
                      stride_bn, stride_br, stride_ym, stride_yn,
                      HAS_BIAS, EXPAND, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


def plan(x2, w, w_strides, w_t: bool, bias, b, b_strides, us, y, *, r: int, use_tma: bool,
         cfg: FwdConfig, sms: int) -> Launch:
    """The Launch of one GEMM + expand (tensors allocated).

    x2: (M, K) rows; w: W' read through ``w_strides`` = (stride over output columns, stride
    over K), ``w_t`` when that is reduction-major; b / us: B' through ``b_strides`` and the
    rank-R operand (M, r), both None for no expand; y: (M, N) output.
    """
    m, k = x2.shape
    n = y.shape[1]
    sched = triton_schedule.forward_schedule(m, n, cfg.block_m, cfg.block_n, cfg.block_r,
                                             sms, computes_u=False)
    expand = us is not None
    args = dict(
        x_ptr=x2, w_ptr=w, bias_ptr=bias if bias is not None else x2,
        b_ptr=b if expand else x2, us_ptr=us if expand else x2, y_ptr=y,
        M=m, N=n, K=k, R=r,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_wn=w_strides[0], stride_wk=w_strides[1],
        stride_bn=b_strides[0], stride_br=b_strides[1],
        stride_usm=us.stride(0) if expand else 0, stride_usr=us.stride(1) if expand else 0,
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        m_bucket=m_bucket(m),
        HAS_BIAS=bias is not None, EXPAND=expand, USE_TMA=use_tma, W_T=w_t,
        UPCAST=interpreting() and x2.dtype != torch.float32,
        PRECISION=input_precision(x2.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
    )
    return Launch(_gemm_expand_kernel, (sched.programs,), args, cfg.num_warps, cfg.num_stages)


def gemm_plan(x2, weight, bias, lora_b, us, y, *, cfg: FwdConfig, sms: int) -> Launch:
    """The split's second Launch: y = x W^T + bias + us B^T with us given (pointer loads)."""
    return plan(x2, weight, weight.stride(), False, bias, lora_b, lora_b.stride(), us, y,
                r=us.shape[1], use_tma=False, cfg=cfg, sms=sms)


def dx_plan(dy2, weight, lora_a, gs, dx, *, use_tma: bool, cfg: FwdConfig, sms: int) -> Launch:
    """dx = dy W + gs A (gs None: dy W alone). This GEMM's W' is W read transposed (output
    columns = K, reduction over N), its B' is A^T."""
    return plan(dy2, weight, (weight.stride(1), weight.stride(0)), True, None, lora_a,
                (lora_a.stride(1), lora_a.stride(0)), gs, dx, r=lora_a.shape[0],
                use_tma=use_tma, cfg=cfg, sms=sms)


def expand_into_gemm(x2, weight, bias, lora_b, us, cfg: FwdConfig | None = None):
    """y = x W^T + bias + us B^T with a given rank-R operand us (M x R): the second launch of
    the split alternative (kernels/triton_split.py)."""
    m, k = x2.shape
    n = weight.shape[0]
    is_aligned = aligned(k, n, x2.stride(0), weight.stride(0))
    if cfg is None and x2.device.type == "cuda" and not interpreting():
        tiles = gemm_default(arch_of(x2.device), n, us.shape[1], is_aligned, x2.dtype)
        sms = sm_count(x2.device)
    else:
        tiles, sms = device_facts(x2.device, n, us.shape[1], cfg, is_aligned, x2.dtype,
                                  tma=False, gemm=True)
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    run_tuned(gemm_plan(x2, weight, bias, lora_b, us, y, cfg=tiles, sms=sms), x2.device, cfg,
              computes_u=False)
    return y


def input_grad(dy2, weight, lora_a, gs, cfg: FwdConfig | None = None):
    """dx = dy W + gs A as one fused launch; gs=None gives dx = dy W alone (the in-op dropout
    backward adds its masked term in its own pass)."""
    m, n = dy2.shape
    k, r = weight.shape[1], lora_a.shape[0]
    use_tma = tma_allowed(dy2.device, dy2, weight)
    tiles, sms = device_facts(dy2.device, k, r, cfg, aligned(k, n, dy2.stride(0)), dy2.dtype,
                              use_tma, gemm=True)
    dx = torch.empty((m, k), device=dy2.device, dtype=dy2.dtype)
    launch = dx_plan(dy2, weight, lora_a, gs, dx, use_tma=use_tma, cfg=tiles, sms=sms)
    run_tuned(launch, dy2.device, cfg, computes_u=False)
    return dx
