"""Triton forward of lora_linear: the frozen GEMM, both LoRA branches and the per-row mix in
one kernel launch.

    y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + sum_r us[m, r] B[n, r]
    us      = (u * S).to(x.dtype),    u[m, r] = sum_k x[m, k] A[r, k]   (fp32 accumulators)

Each program owns a (BLOCK_M, BLOCK_N) tile of y. Its K loop loads one x tile and feeds it to
two dots: x @ W^T into the (BLOCK_M, BLOCK_N) accumulator and x @ A^T into a (BLOCK_M, BLOCK_R)
accumulator (R padded to BLOCK_R >= 16, the smallest GPU dot). The epilogue scales u by S in
fp32, casts once, adds us @ B^T and the bias, and stores. Every program of a row block
recomputes u: R / BLOCK_N extra dot work (R = 32, BLOCK_N = 128: 25 %) in exchange for a
single pass over x and no intermediate in memory.

LORA_INPUT (LoRA dropout: the A branch reads xl = dropout(x), the frozen GEMM x): the K loop
loads the xl tile next to the x tile and feeds the A dot with it. A constexpr flag, so the
kernel without lora_input is unchanged.

The same kernel computes the backward's dx = dy W + gs A (US_GIVEN: the rank-R operand gs is
loaded instead of computed; W and A are read through transposed strides), and the plain
dx = dy W of the lora_input backward (EXPAND=False: no rank-R term).

Decode path (small M): split-K. Each (row block, column block, K slice) program writes a
partial y_k = x_k W_k^T + ((u_k * S) B^T in fp32) and a partial u_k to fp32 workspaces that
are summed afterwards. Exact up to fp32 rounding because the expand is linear in u.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_config import FwdConfig, fwd_config, interpreting, input_precision


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, us_ptr, y_ptr, u_ptr, xl_ptr,
    M, N, K, R,
    stride_xm, stride_xk,
    stride_xlm, stride_xlk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_usm, stride_usr,
    stride_ys, stride_ym, stride_yn,
    stride_us_split, stride_um, stride_ur,
    HAS_BIAS: tl.constexpr, US_GIVEN: tl.constexpr, STORE_U: tl.constexpr,
    LORA_INPUT: tl.constexpr, EXPAND: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks walk the column blocks together, so the W tiles
    # they share stay in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    # This program's K slice (the whole K unless split-K).
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_t = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                      mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (DESIGN section 2): dot in fp32
            x = x.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
        if not US_GIVEN:
            a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + kk[:, None] * stride_ak,
                          mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if UPCAST:
                a_t = a_t.to(tl.float32)
            if LORA_INPUT:  # same K tile of the A branch's own input (rows of xl like x)
                xl = tl.load(xl_ptr + offs_m[:, None] * stride_xlm + kk[None, :] * stride_xlk,
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                if UPCAST:
                    xl = xl.to(tl.float32)
                u = tl.dot(xl, a_t, u, input_precision=PRECISION)
            else:
                u = tl.dot(x, a_t, u, input_precision=PRECISION)

    if EXPAND:
        b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                      mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if US_GIVEN:
            us = tl.load(us_ptr + offs_m[:, None] * stride_usm + offs_r[None, :] * stride_usr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        else:
            # stride_sm is 0 for a (1, R) scale: every row reads the same factors.
            s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if STORE_U:
                if pid_n == 0:  # one column block stores u (per K slice) for the backward
                    tl.store(u_ptr + pid_k * stride_us_split + offs_m[:, None] * stride_um
                             + offs_r[None, :] * stride_ur, u,
                             mask=mask_m[:, None] & mask_r[None, :])
            if SPLIT_K == 1:
                us = (u * s).to(y_ptr.dtype.element_ty)  # scaled in fp32, cast once
            else:
                us = u * s  # partial u: keep fp32, the partial expands are summed in fp32
                b_t = b_t.to(tl.float32)
        if UPCAST:
            us = us.to(tl.float32)
            b_t = b_t.to(tl.float32)
        acc = tl.dot(us, b_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        if pid_k == 0:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _launch(x2, w_strides, weight, bias, a_strides, lora_a, b_strides, lora_b, scale, us,
            n_out, r, store_u, cfg: FwdConfig, xl2=None, expand=True):
    """Shared launcher of the forward (us=None; xl2: the A branch's input if not x2) and of
    dx (us given, or expand=False for dx = dy W alone). x2 is (M, K_red)."""
    m, k = x2.shape
    out_dtype = x2.dtype
    split = cfg.split_k
    if split == 1:
        y = torch.empty((m, n_out), device=x2.device, dtype=out_dtype)
        y_strides = (0, y.stride(0), y.stride(1))
    else:
        y = torch.empty((split, m, n_out), device=x2.device, dtype=torch.float32)
        y_strides = y.stride()
    u = None
    if store_u:
        u = torch.empty((split, m, r), device=x2.device, dtype=torch.float32)
    u_strides = u.stride() if u is not None else (0, 0, 0)
    s_strides = (0 if scale is None or scale.shape[0] == 1 else scale.stride(0),
                 scale.stride(1) if scale is not None else 0)
    us_strides = us.stride() if us is not None else (0, 0)
    xl_strides = xl2.stride() if xl2 is not None else (0, 0)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n_out, cfg.block_n), split)
    _lora_fwd_kernel[grid](
        x2, weight, bias if bias is not None else x2, lora_a if lora_a is not None else x2,
        lora_b, scale if scale is not None else x2, us if us is not None else x2, y,
        u if u is not None else x2, xl2 if xl2 is not None else x2,
        m, n_out, k, r,
        x2.stride(0), x2.stride(1), *xl_strides, *w_strides, *a_strides, *b_strides, *s_strides,
        *us_strides, *y_strides, *u_strides,
        # US_GIVEN means "u is not computed here": also true of the plain GEMM (no expand).
        HAS_BIAS=bias is not None, US_GIVEN=us is not None or not expand, STORE_U=store_u,
        LORA_INPUT=xl2 is not None, EXPAND=expand,
        SPLIT_K=split, UPCAST=interpreting() and out_dtype != torch.float32,
        PRECISION=input_precision(out_dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=cfg.block_r, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:  # sum the fp32 partials (bias was added by slice 0 only)
        y = y.sum(0).to(out_dtype)
        if u is not None:
            u = u.sum(0)
    elif u is not None:
        u = u[0]
    return y, u


def _rows(t, k):
    """t as an (M, K) matrix: row-strided input is read in place, anything else copied once."""
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def forward(x, weight, bias, lora_a, lora_b, scale, lora_input=None,
            cfg: FwdConfig | None = None):
    """y and u (fp32, M x R) of lora_linear on Triton; inputs already validated."""
    k = x.shape[-1]
    n, r = weight.shape[0], lora_a.shape[0]
    x2 = _rows(x, k)
    xl2 = _rows(lora_input, k) if lora_input is not None else None
    cfg = cfg or fwd_config(x2.shape[0], n, k, r, x.device)
    y, u = _launch(x2, (weight.stride(0), weight.stride(1)), weight, bias,
                   (lora_a.stride(0), lora_a.stride(1)), lora_a,
                   (lora_b.stride(0), lora_b.stride(1)), lora_b, scale, None,
                   n, r, True, cfg, xl2=xl2)
    return y.view(*x.shape[:-1], n), u


def input_grad(dy2, weight, lora_a, gs, cfg: FwdConfig | None = None):
    """dx = dy W + gs A as one fused launch (the forward kernel with W^T and A^T strides);
    gs=None gives dx = dy W alone (the lora_input backward) from the same kernel."""
    m, n = dy2.shape
    k, r = weight.shape[1], lora_a.shape[0]
    cfg = (cfg or fwd_config(m, k, n, r, dy2.device, split_k=1)).with_split_k(1)
    # "weight" of this GEMM is W^T (K_out = K, reduction over N); "lora_b" is A^T (K, R).
    dx, _ = _launch(dy2, (weight.stride(1), weight.stride(0)), weight, None, (0, 0), None,
                    (lora_a.stride(1), lora_a.stride(0)), lora_a, None, gs, k, r, False, cfg,
                    expand=gs is not None)
    return dx
