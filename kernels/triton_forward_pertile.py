"""The previous single-launch forward, kept as a measured alternative (bench/op_gpu.py
provider ``fused_pertile``; the static report compiles it too): one program per output tile.

    y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + sum_r us[m, r] B[n, r]
    us      = (u * S).to(x.dtype),    u[m, r] = sum_k x[m, k] A[r, k]   (fp32 accumulators)

Each program's K loop feeds one x tile to two dots, x W^T and x A^T, so every column tile of
a row block recomputes u: (col_tiles - 1) * BLOCK_R / (col_tiles * BLOCK_N) extra
tensor-core work, about R / BLOCK_N (12.5 % at R = 32, BLOCK_N = 256). kernels/triton_forward.py
replaces it. Grouped tile order: GROUP_M row blocks walk the column blocks together.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_config import FwdConfig, arch_of, fwd_default, input_precision, interpreting
from .triton_launch import Launch
from .triton_tiles import tile_k_loop


@triton.jit
def _lora_fwd_pertile_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, y_ptr, u_ptr,
    # sizes
    M, N, K, R,
    # strides (u is contiguous, M x R)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_sm, stride_sr, stride_ym, stride_yn,
    # modes
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_n, mask_r = offs_m < M, offs_n < N, offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc, u = tile_k_loop(acc, u, x_ptr, w_ptr, a_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, 0, K,
                         M, N, R, stride_xm, stride_xk, stride_wn, stride_wk,
                         stride_ar, stride_ak, True, False, False, UPCAST, PRECISION,
                         BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    if pid_n == 0:  # one column block stores u for the backward
        tl.store(u_ptr + offs_m[:, None] * R + offs_r[None, :], u,
                 mask=mask_m[:, None] & mask_r[None, :])
    us = (u * s).to(y_ptr.dtype.element_ty)
    b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                  mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    if UPCAST:
        us = us.to(tl.float32)
        b_t = b_t.to(tl.float32)
    acc = tl.dot(us, b_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym
             + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def plan(x2, weight, bias, lora_a, lora_b, scale, y, u, cfg: FwdConfig,
         group_m: int = 8) -> Launch:
    """The Launch of one per-tile forward call (y and the contiguous fp32 u allocated)."""
    m, k = x2.shape
    n, r = weight.shape[0], lora_a.shape[0]
    args = dict(
        x_ptr=x2, w_ptr=weight, bias_ptr=bias if bias is not None else x2, a_ptr=lora_a,
        b_ptr=lora_b, s_ptr=scale, y_ptr=y, u_ptr=u, M=m, N=n, K=k, R=r,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1),
        stride_bn=lora_b.stride(0), stride_br=lora_b.stride(1),
        stride_sm=0 if scale.shape[0] == 1 else scale.stride(0), stride_sr=scale.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None, UPCAST=interpreting() and x2.dtype != torch.float32,
        PRECISION=input_precision(x2.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
        GROUP_M=group_m,
    )
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    return Launch(_lora_fwd_pertile_kernel, grid, args, cfg.num_warps, cfg.num_stages)


def forward(x, weight, bias, lora_a, lora_b, scale, cfg: FwdConfig | None = None):
    """(y, u) of lora_linear through the per-tile kernel (benchmark, tests)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    n = weight.shape[0]
    if cfg is None:
        from .triton_config import interpreter_config
        cfg = (interpreter_config(lora_a.shape[0]) if interpreting()
               else fwd_default(arch_of(x.device), n, lora_a.shape[0], True, x.dtype,
                                tma=False))
    y = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    u = torch.empty((x2.shape[0], lora_a.shape[0]), device=x.device, dtype=torch.float32)
    plan(x2, weight, bias, lora_a, lora_b, scale, y, u, cfg).run()
    return y.view(*x.shape[:-1], n), u
