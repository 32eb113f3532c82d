"""Triton forward of lora_linear: the frozen GEMM, both LoRA branches and the per-row mix in
one kernel launch, with u = x A^T computed once per program (kernels/triton_schedule.py).

    y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + sum_r us[m, r] B[n, r]
    us      = (u * S).to(x.dtype),    u[m, r] = sum_k x[m, k] A[r, k]    (fp32 accumulators)

In-op dropout takes the split forward (kernels/triton_split.py), whose shrink applies the mask.

Schedule: the grid is row_blocks x chunks programs. Program (row block, chunk) walks a run of
consecutive column tiles of its row block. Its first tile's K loop feeds one x tile to two
dots, x W^T (BLOCK_M x BLOCK_N accumulator) and x A^T (BLOCK_M x BLOCK_R, R padded to a
power of two >= 16); u * S is cast once and kept in registers, and every tile's epilogue adds
us B^T and the bias. The chunk count keeps the recompute of u within 2 % of the base GEMM's
tensor-core work (triton_schedule.forward_schedule; the per-tile schedule it replaces,
kernels/triton_forward_pertile.py, spends BLOCK_R / BLOCK_N, 12.5 % at R = 32, BN = 256).

USE_TMA (sm_90+, 16-bit, 16-byte aligned rows): x, W and A tiles come through tensor
descriptors (TMA loads, out-of-bounds rows and columns zero-filled by the copy engine) instead
of masked pointer loads.

The GEMM with a given rank-R operand (the backward's dx, the split's second launch) is its own
kernel over the same tile helpers: kernels/triton_gemm.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_schedule
from .triton_autotune import run_tuned
from .triton_config import DECODE_MAX_M, FwdConfig, aligned, input_precision, interpreting
from .triton_launch import Launch, device_facts, m_bucket, matrix_rows, tma_allowed
from .triton_tiles import tile_epilogue, tile_k_loop


@triton.jit(do_not_specialize=["m_bucket"])  # a key for the autotuner, not a compile input
def _lora_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, y_ptr, u_ptr,
    # sizes (y is M x N, the reduction runs over K; R real rank columns)
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_sm, stride_sr, stride_ym, stride_yn, stride_um, stride_ur,
    # autotune key only: the M bucket (the body never reads it)
    m_bucket,
    # modes
    HAS_BIAS: tl.constexpr,     # add bias[n]
    STORE_U: tl.constexpr,      # write the fp32 u (M x R) for the backward
    USE_TMA: tl.constexpr,      # x, W, A through tensor descriptors
    UPCAST: tl.constexpr,       # interpreter only: 16-bit tiles to fp32 before each dot
    PRECISION: tl.constexpr,    # tl.dot input precision (tf32 / ieee)
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(M, BLOCK_M)
    col_tiles = tl.cdiv(N, BLOCK_N)
    chunks = tl.num_programs(0) // row_blocks
    row_block = pid // chunks
    chunk = pid % chunks
    tile_first = chunk * col_tiles // chunks
    tile_end = (chunk + 1) * col_tiles // chunks
    off_m = row_block * BLOCK_M
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_mr = (offs_m[:, None] < M) & (offs_r[None, :] < R)

    if USE_TMA:
        x_src = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                          block_shape=[BLOCK_M, BLOCK_K])
        w_src = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                          block_shape=[BLOCK_N, BLOCK_K])
        a_src = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[stride_ar, 1],
                                          block_shape=[BLOCK_R, BLOCK_K])
    else:
        x_src, w_src, a_src = x_ptr, w_ptr, a_ptr

    # First tile of the run: the K loop also accumulates u, once for the whole run.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc, u = tile_k_loop(acc, u, x_src, w_src, a_src, off_m, tile_first * BLOCK_N, 0, K,
                         M, N, R, stride_xm, stride_xk, stride_wn, stride_wk,
                         stride_ar, stride_ak, True, USE_TMA, False, UPCAST, PRECISION,
                         BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    if STORE_U:
        if chunk == 0:  # one program per row block writes u for the backward
            tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u,
                     mask=mask_mr)
    # stride_sm is 0 for a (1, R) scale: every row reads the same factors.
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=mask_mr, other=0.0)
    us = (u * s).to(y_ptr.dtype.element_ty)  # scaled in fp32, cast once
    if UPCAST:
        us = us.to(tl.float32)
    tile_epilogue(acc, us, b_ptr, bias_ptr, y_ptr, off_m, tile_first * BLOCK_N, M, N, R,
                  stride_bn, stride_br, stride_ym, stride_yn,
                  HAS_BIAS, True, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)

    for tile in range(tile_first + 1, tile_end):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc, _ = tile_k_loop(acc, u, x_src, w_src, a_src, off_m, tile * BLOCK_N, 0, K,
                             M, N, R, stride_xm, stride_xk, stride_wn, stride_wk,
                             stride_ar, stride_ak, False, USE_TMA, False, UPCAST, PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        tile_epilogue(acc, us, b_ptr, bias_ptr, y_ptr, off_m, tile * BLOCK_N, M, N, R,
                      stride_bn, stride_br, stride_ym, stride_yn,
                      HAS_BIAS, True, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


def forward_plan(x2, weight, bias, lora_a, lora_b, scale, y, u, *, use_tma: bool,
                 cfg: FwdConfig, sms: int, chunks: int | None = None) -> Launch:
    """The forward's Launch: y = x W^T + bias + ((x A^T) S) B^T, u stored (tensors allocated).

    chunks: force the runs per row block (tests of the multi-run path; 1..column tiles), else
    triton_schedule chooses.
    """
    m, k = x2.shape
    n, r = y.shape[1], lora_a.shape[0]
    sched = triton_schedule.forward_schedule(m, n, cfg.block_m, cfg.block_n, cfg.block_r,
                                             sms, computes_u=True)
    programs = sched.programs if chunks is None else sched.row_blocks * chunks
    args = dict(
        x_ptr=x2, w_ptr=weight, bias_ptr=bias if bias is not None else x2, a_ptr=lora_a,
        b_ptr=lora_b, s_ptr=scale, y_ptr=y, u_ptr=u,
        M=m, N=n, K=k, R=r,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1),
        stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1),
        stride_sm=0 if scale.shape[0] == 1 else scale.stride(0), stride_sr=scale.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_um=u.stride(0), stride_ur=u.stride(1),
        m_bucket=m_bucket(m),
        HAS_BIAS=bias is not None, STORE_U=True, USE_TMA=use_tma,
        UPCAST=interpreting() and x2.dtype != torch.float32,
        PRECISION=input_precision(x2.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
    )
    return Launch(_lora_fwd_kernel, (programs,), args, cfg.num_warps, cfg.num_stages)


def forward(x, weight, bias, lora_a, lora_b, scale, cfg: FwdConfig | None = None):
    """y and u (fp32, M x R) of lora_linear on Triton; inputs already validated.

    Decode-sized M (<= DECODE_MAX_M) on CUDA takes the split-K kernel (triton_decode.py);
    a given ``cfg`` fixes the tiles (tests, the static report) and skips autotuning.
    """
    k = x.shape[-1]
    n, r = weight.shape[0], lora_a.shape[0]
    x2 = matrix_rows(x, k)
    m = x2.shape[0]
    if m <= DECODE_MAX_M and x.device.type == "cuda" and cfg is None:
        from . import triton_decode
        y, u = triton_decode.forward(x2, weight, bias, lora_a, lora_b, scale)
        return y.view(*x.shape[:-1], n), u
    use_tma = tma_allowed(x.device, x2, weight, lora_a)
    tiles, sms = device_facts(x.device, n, r, cfg, aligned(k, n, x2.stride(0), weight.stride(0)),
                              x.dtype, use_tma)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    u = torch.empty((m, r), device=x.device, dtype=torch.float32)
    launch = forward_plan(x2, weight, bias, lora_a, lora_b, scale, y, u, use_tma=use_tma,
                          cfg=tiles, sms=sms)
    run_tuned(launch, x.device, cfg, computes_u=True)
    return y.view(*x.shape[:-1], n), u
