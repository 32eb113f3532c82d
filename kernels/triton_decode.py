"""Triton forward of lora_linear for decode-sized M (<= DECODE_MAX_M rows): split-K in one
launch.

    y = x W^T + bias + ((x A^T) * S) B^T

A (column tile, K slice) grid: with few rows, the plain grid has too few programs to stream W
at the memory's rate, so each column tile's K range is cut into ``split`` slices
(kernels/triton_schedule.decode_schedule). Program (n, s) computes the partial
y_s = x_s W_s^T + ((u_s * S) B^T in fp32) and the partial u_s over its slice (exact up to
fp32 rounding: the expand is linear in u). The partials of one column tile are reduced inside
the launch by the last of its programs to arrive:

    store partial -> barrier -> counter[n] += 1 (acq_rel) -> if it was split - 1:
        barrier; y = the partials in slice order (its own from registers, the others read
        past L1: deterministic whoever arrives last) + bias; store y in x's dtype (and u,
        summed the same way, by column tile 0); reset counter[n] to 0

The counters live in a zeroed int32 buffer per (device, stream) that every launch leaves
zeroed again, so no memset runs per call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_schedule
from .triton_config import (
    FwdConfig,
    aligned,
    arch_of,
    autotune_enabled,
    decode_default,
    input_precision,
    interpreter_config,
    interpreting,
    sm_count,
)
from .triton_launch import Launch, m_bucket
from .triton_tiles import tile_k_loop


@triton.jit
def _sum_slices(own, part_ptr, offs, mask, pid_k, split, slice_stride):
    """Sum over the K slices of one tile's partials, in slice order: this program's own from
    registers, the others read past L1 (.cg: written by other SMs)."""
    total = tl.zeros(own.shape, dtype=tl.float32)
    for other in range(0, split):
        if other == pid_k:
            total += own
        else:
            total += tl.load(part_ptr + other * slice_stride + offs, mask=mask, other=0.0,
                             cache_modifier=".cg")
    return total


@triton.jit(do_not_specialize=["m_bucket"])  # a key for the autotuner, not a compile input
def _lora_decode_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, y_ptr, u_ptr,
    y_part_ptr, u_part_ptr, count_ptr,
    # sizes
    M, N, K, R,
    # strides (the partials are contiguous: (split, M, N) and (split, M, R))
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ar, stride_ak, stride_bn, stride_br, stride_sm, stride_sr,
    stride_ym, stride_yn, stride_um, stride_ur,
    # autotune key only
    m_bucket,
    # modes
    HAS_BIAS: tl.constexpr, STORE_U: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    # tiles (BLOCK_M >= M: one row block)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.num_programs(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), split) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc, u = tile_k_loop(acc, u, x_ptr, w_ptr, a_ptr, 0, pid_n * BLOCK_N, k_start, k_end,
                         M, N, R, stride_xm, stride_xk, stride_wn, stride_wk,
                         stride_ar, stride_ak, True, False, False, UPCAST, PRECISION,
                         BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)

    # The partial expand, in fp32 (u_s is only a partial sum: it is not cast to x's dtype).
    mask_mr = mask_m[:, None] & mask_r[None, :]
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=mask_mr, other=0.0)
    b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                  mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    acc = tl.dot(u * s, b_t, acc, input_precision=PRECISION)

    mask_mn = mask_m[:, None] & mask_n[None, :]
    part_mn = offs_m[:, None] * N + offs_n[None, :]
    part_mr = offs_m[:, None] * R + offs_r[None, :]
    tl.store(y_part_ptr + pid_k * M * N + part_mn, acc, mask=mask_mn)
    if STORE_U:
        if pid_n == 0:
            tl.store(u_part_ptr + pid_k * M * R + part_mr, u, mask=mask_mr)
    tl.debug_barrier()  # every thread's partial is written before the release below
    arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
    if arrived == split - 1:  # the last program of this column tile reduces
        tl.debug_barrier()
        # Summed in slice order whoever arrives last, so the result is deterministic.
        total = _sum_slices(acc, y_part_ptr, part_mn, mask_mn, pid_k, split, M * N)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
            total += bias.to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 total.to(y_ptr.dtype.element_ty), mask=mask_mn)
        if STORE_U:
            if pid_n == 0:
                u_total = _sum_slices(u, u_part_ptr, part_mr, mask_mr, pid_k, split, M * R)
                tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                         u_total, mask=mask_mr)
        tl.atomic_xchg(count_ptr + pid_n, 0)  # zeroed again for the next launch


_COUNTERS: dict = {}
# Column tiles one launch may have: N up to 4M columns at BLOCK_N = 64 (256 KB of int32). The
# buffer is never replaced or freed, because a captured CUDA graph keeps its address.
COUNTER_CAPACITY = 1 << 16


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The zeroed arrival counters of (device, current stream); every launch leaves the ones
    it used at zero again."""
    if tiles > COUNTER_CAPACITY:
        raise ValueError(f"decode kernel: {tiles} column tiles exceed the {COUNTER_CAPACITY} "
                         "arrival counters (N too large for the decode path)")
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(COUNTER_CAPACITY, device=device, dtype=torch.int32)
    return _COUNTERS[key]


def partials(slices: int, m: int, n: int, r: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 workspaces of the partial y (slices, M, N) and u (slices, M, R)."""
    return (torch.empty((slices, m, n), device=device, dtype=torch.float32),
            torch.empty((slices, m, r), device=device, dtype=torch.float32))


def plan(x2, weight, bias, lora_a, lora_b, scale, y, u, *, cfg: FwdConfig, sms: int,
         split_capacity: int = 0, split: int | None = None) -> Launch:
    """The Launch of one decode call (y, u allocated; partials and counters taken here).
    ``split_capacity``: room for that many K slices of partials (the autotuner's largest);
    ``split``: force the number of K slices (tests), else triton_schedule chooses."""
    m, k = x2.shape
    n, r = weight.shape[0], lora_a.shape[0]
    if m > cfg.block_m:
        raise ValueError(f"decode kernel: M = {m} rows exceed BLOCK_M = {cfg.block_m}")
    sched = triton_schedule.decode_schedule(m, n, k, cfg.block_m, cfg.block_n, cfg.block_k,
                                            cfg.block_r, sms)
    split = split or sched.chunks
    y_part, u_part = partials(max(split, split_capacity), m, n, r, x2.device)
    args = dict(
        x_ptr=x2, w_ptr=weight,
        bias_ptr=bias if bias is not None else x2, a_ptr=lora_a, b_ptr=lora_b, s_ptr=scale,
        y_ptr=y, u_ptr=u, y_part_ptr=y_part, u_part_ptr=u_part,
        count_ptr=_counters(x2.device, sched.col_tiles),
        M=m, N=n, K=k, R=r,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1),
        stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1),
        stride_sm=0 if scale.shape[0] == 1 else scale.stride(0), stride_sr=scale.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_um=u.stride(0), stride_ur=u.stride(1),
        m_bucket=m_bucket(m),
        HAS_BIAS=bias is not None, STORE_U=True,
        UPCAST=interpreting() and x2.dtype != torch.float32,
        PRECISION=input_precision(x2.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
    )
    return Launch(_lora_decode_kernel, (sched.col_tiles, split), args, cfg.num_warps,
                  cfg.num_stages)


def forward(x2, weight, bias, lora_a, lora_b, scale, cfg: FwdConfig | None = None,
            split: int | None = None):
    """(y, u) for x2 (M x K, M <= DECODE_MAX_M) in one launch; ``cfg`` fixes the tiles and
    ``split`` the K slices (tests; both skip autotuning)."""
    m = x2.shape[0]
    n, r = weight.shape[0], lora_a.shape[0]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    u = torch.empty((m, r), device=x2.device, dtype=torch.float32)
    on_gpu = x2.device.type == "cuda" and not interpreting()
    if on_gpu:
        is_aligned = aligned(x2.shape[1], n, x2.stride(0), weight.stride(0))
        tiles = cfg or decode_default(arch_of(x2.device), m, r, is_aligned, x2.dtype)
        sms = sm_count(x2.device)
    else:
        tiles, sms = cfg or interpreter_config(r), 4
    tune = on_gpu and cfg is None and split is None and autotune_enabled()
    capacity = 0
    if tune:
        from . import triton_autotune
        schedules = triton_autotune.decode_schedules(m, n, x2.shape[1], r, x2.device,
                                                     x2.dtype)
        capacity = max(s.chunks for s in schedules)
        _counters(x2.device, max(s.col_tiles for s in schedules))  # raises if N is too large
    launch = plan(x2, weight, bias, lora_a, lora_b, scale, y, u, cfg=tiles, sms=sms,
                  split=split, split_capacity=capacity)
    if tune:
        triton_autotune.run_decode(launch, x2.device)
    else:
        launch.run()
    return y, u
