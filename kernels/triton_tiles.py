"""The tile helpers every forward-family Triton kernel is built on (kernels/triton_forward.py,
triton_gemm.py, triton_decode.py, triton_forward_pertile.py): one output tile's K loop, and
its epilogue. Each kernel is its own ``@triton.jit`` over these, one kernel per job.

    acc[m, n] += sum_k x[m, k] W'[k, n]        W' = W^T, or W itself read reduction-major (W_T)
    u[m, r]   += sum_k x[m, k] A[r, k]         (WITH_U: the A branch, fused into the same loop)
    y tile     = acc + us B'^T + bias          (the epilogue; EXPAND adds the rank-R term)
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_k_loop(acc, u, x_src, w_src, a_src, off_m, off_n, k_lo, k_hi, M, N, R,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                WITH_U: tl.constexpr, USE_TMA: tl.constexpr, W_T: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """acc += x W'^T over K in [k_lo, k_hi) for one output tile; with WITH_U also
    u += x A^T. With USE_TMA the sources are tensor descriptors and k_hi must be the whole K
    (the descriptors bound the tiles); else they are pointers, loads masked."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]  # int64: M x K offsets pass 2^31 at 524k rows of 4096
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if USE_TMA:
            x = x_src.load([off_m, k0])
            if W_T:
                w_t = w_src.load([k0, off_n])
            else:
                w_t = w_src.load([off_n, k0]).T
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_src + rows * stride_xm + kk[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
            w_t = tl.load(w_src + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                          mask=(kk[:, None] < k_hi) & (offs_n[None, :] < N), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (docs/ARCHITECTURE.md §1): dot in fp32
            x = x.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
        if WITH_U:
            if USE_TMA:
                a_t = a_src.load([0, k0]).T
            else:
                a_t = tl.load(a_src + offs_r[None, :] * stride_ar + kk[:, None] * stride_ak,
                              mask=(kk[:, None] < k_hi) & (offs_r[None, :] < R), other=0.0)
            if UPCAST:
                a_t = a_t.to(tl.float32)
            u = tl.dot(x, a_t, u, input_precision=PRECISION)
    return acc, u


@triton.jit
def tile_epilogue(acc, us, b_ptr, bias_ptr, y_ptr, off_m, off_n, M, N, R,
                  stride_bn, stride_br, stride_ym, stride_yn,
                  HAS_BIAS: tl.constexpr, EXPAND: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y tile = acc + us B^T + bias, cast to y's dtype and stored."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]  # int64: M x N offsets pass 2^31 (e.g. 195k x 11008)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    if EXPAND:
        b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                      mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0)
        if UPCAST:
            b_t = b_t.to(tl.float32)
        acc = tl.dot(us, b_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + rows * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])
