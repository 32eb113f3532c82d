"""Triton forward of lora_linear: the frozen GEMM, both LoRA branches and the per-row mix in
one kernel launch, with u = x A^T computed once per program (kernels/triton_schedule.py).

    y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + sum_r us[m, r] B[n, r]
    us      = (u * S).to(x.dtype),    u[m, r] = sum_k xa[m, k] A[r, k]   (fp32 accumulators)

xa is x, or the A branch's own input xl (LORA_INPUT; the frozen GEMM reads x). In-op dropout
takes the split forward (kernels/triton_split.py), whose shrink applies the mask.

Schedule: the grid is row_blocks x chunks programs. Program (row block, chunk) walks a run of
consecutive column tiles of its row block. Its first tile's K loop feeds one x tile to two
dots, x W^T (BLOCK_M x BLOCK_N accumulator) and xa A^T (BLOCK_M x BLOCK_R, R padded to a
power of two >= 16); u * S is cast once and kept in registers, and every tile's epilogue adds
us B^T and the bias. The chunk count keeps the recompute of u within 2 % of the base GEMM's
tensor-core work (triton_schedule.forward_schedule; the per-tile schedule it replaces,
kernels/triton_forward_pertile.py, spends BLOCK_R / BLOCK_N, 12.5 % at R = 32, BN = 256).

USE_TMA (sm_90+, 16-bit, 16-byte aligned rows): x, xl, W and A tiles come through tensor
descriptors (TMA loads, out-of-bounds rows and columns zero-filled by the copy engine) instead
of masked pointer loads.

The same kernel serves the backward's dx = dy W + gs A and the second launch of the split
alternative (COMPUTE_U=False, EXPAND=True: the rank-R operand us is loaded, not computed; W and
A are read through transposed strides for dx), and dx = dy W alone (EXPAND=False).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_schedule
from .triton_config import (
    DECODE_MAX_M,
    FwdConfig,
    aligned,
    arch_of,
    autotune_enabled,
    fwd_default,
    gemm_default,
    input_precision,
    interpreter_config,
    interpreting,
    sm_count,
)
from .triton_launch import Launch, _set_tma_allocator, m_bucket, tma_allowed


@triton.jit
def _tile_k_loop(acc, u, x_src, xl_src, w_src, a_src, off_m, off_n, k_lo, k_hi,
                 M, N, R,
                 stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk,
                 stride_ar, stride_ak,
                 WITH_U: tl.constexpr, LORA_INPUT: tl.constexpr, USE_TMA: tl.constexpr,
                 W_T: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """acc += x W^T over K in [k_lo, k_hi) for one output tile; with WITH_U also
    u += xa A^T. With USE_TMA k_hi must be the whole K (the descriptors bound the tiles)."""
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
                if LORA_INPUT:
                    xa = xl_src.load([off_m, k0])
                else:
                    xa = x
            else:
                a_t = tl.load(a_src + offs_r[None, :] * stride_ar + kk[:, None] * stride_ak,
                              mask=(kk[:, None] < k_hi) & (offs_r[None, :] < R), other=0.0)
                if LORA_INPUT:
                    xa = tl.load(xl_src + rows * stride_xlm + kk[None, :] * stride_xlk,
                                 mask=(offs_m[:, None] < M) & (kk[None, :] < k_hi),
                                 other=0.0)
                else:
                    xa = x
            if UPCAST:
                a_t = a_t.to(tl.float32)
                xa = xa.to(tl.float32)
            u = tl.dot(xa, a_t, u, input_precision=PRECISION)
    return acc, u


@triton.jit
def _tile_epilogue(acc, us, b_ptr, bias_ptr, y_ptr, off_m, off_n,
                   M, N, R,
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


@triton.jit(do_not_specialize=["m_bucket"])  # a key for the autotuner, not a compile input
def _lora_fwd_kernel(
    # pointers
    x_ptr, xl_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, us_ptr, y_ptr, u_ptr,
    # sizes (y is M x N, the reduction runs over K; R real rank columns)
    M, N, K, R,
    # strides
    stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn, stride_wk,
    stride_ar, stride_ak, stride_bn, stride_br, stride_sm, stride_sr,
    stride_usm, stride_usr, stride_ym, stride_yn, stride_um, stride_ur,
    # autotune key only: the M bucket (the body never reads it)
    m_bucket,
    # modes
    HAS_BIAS: tl.constexpr,     # add bias[n]
    COMPUTE_U: tl.constexpr,    # u = xa A^T here (the forward); else us is loaded if EXPAND
    LORA_INPUT: tl.constexpr,   # xa = xl (the A branch's own input) instead of x
    EXPAND: tl.constexpr,       # add the rank-R term us B^T
    STORE_U: tl.constexpr,      # write the fp32 u (M x R) for the backward
    USE_TMA: tl.constexpr,      # x, xl, W, A through tensor descriptors
    W_T: tl.constexpr,          # the GEMM's weight is stored reduction-major (K x N): dx
                                # reads the op's W (N_op x K_op) that way
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
        if W_T:
            w_src = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_wk, 1],
                                              block_shape=[BLOCK_K, BLOCK_N])
        else:
            w_src = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                              block_shape=[BLOCK_N, BLOCK_K])
        a_src, xl_src = a_ptr, x_src
        if COMPUTE_U:  # only then are A (and xl) real tensors
            a_src = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[stride_ar, 1],
                                              block_shape=[BLOCK_R, BLOCK_K])
            if LORA_INPUT:
                xl_src = tl.make_tensor_descriptor(xl_ptr, shape=[M, K],
                                                   strides=[stride_xlm, 1],
                                                   block_shape=[BLOCK_M, BLOCK_K])
    else:
        x_src, xl_src, w_src, a_src = x_ptr, xl_ptr, w_ptr, a_ptr

    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    us = u
    tile_next = tile_first
    if COMPUTE_U:
        # First tile of the run: the K loop also accumulates u, once for the whole run.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc, u = _tile_k_loop(acc, u, x_src, xl_src, w_src, a_src, off_m,
                              tile_first * BLOCK_N, 0, K, M, N, R,
                              stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn,
                              stride_wk, stride_ar, stride_ak,
                              True, LORA_INPUT, USE_TMA, W_T, UPCAST, PRECISION,
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
        _tile_epilogue(acc, us, b_ptr, bias_ptr, y_ptr, off_m, tile_first * BLOCK_N, M, N, R,
                       stride_bn, stride_br, stride_ym, stride_yn,
                       HAS_BIAS, EXPAND, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
        tile_next = tile_first + 1
    elif EXPAND:
        us = tl.load(us_ptr + offs_m[:, None] * stride_usm + offs_r[None, :] * stride_usr,
                     mask=mask_mr, other=0.0)
        if UPCAST:
            us = us.to(tl.float32)

    for tile in range(tile_next, tile_end):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc, _ = _tile_k_loop(acc, u, x_src, xl_src, w_src, a_src, off_m, tile * BLOCK_N,
                              0, K, M, N, R,
                              stride_xm, stride_xk, stride_xlm, stride_xlk, stride_wn,
                              stride_wk, stride_ar, stride_ak,
                              False, LORA_INPUT, USE_TMA, W_T, UPCAST, PRECISION,
                              BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        _tile_epilogue(acc, us, b_ptr, bias_ptr, y_ptr, off_m, tile * BLOCK_N, M, N, R,
                       stride_bn, stride_br, stride_ym, stride_yn,
                       HAS_BIAS, EXPAND, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


def _placeholder(t, fallback):
    return t if t is not None else fallback


def plan(x2, w, w_strides, bias, a, a_strides, b, b_strides, scale, us, y, u, xl2, *, r: int,
         compute_u: bool, expand: bool, use_tma: bool, cfg: FwdConfig, sms: int,
         chunks: int | None = None) -> Launch:
    """The Launch of one forward-family call (tensors already allocated).

    x2: (M, K) rows; w: the GEMM's weight read through ``w_strides`` = (stride over output
    columns, stride over K); a / b: the rank operands through their strides; us: the given
    rank-R operand (when not compute_u); y: (M, N) output; u: fp32 (M, R) output or None;
    r: the real rank (columns of us / rows of A); chunks: force the runs per row block
    (tests of the multi-run path; 1..column tiles), else triton_schedule chooses.
    """
    m, k = x2.shape
    n = y.shape[1]
    sched = triton_schedule.forward_schedule(m, n, cfg.block_m, cfg.block_n, cfg.block_r,
                                             sms, computes_u=compute_u)
    programs = sched.programs if chunks is None else sched.row_blocks * chunks
    s_strides = (0, 0) if scale is None else (
        0 if scale.shape[0] == 1 else scale.stride(0), scale.stride(1))
    args = dict(
        x_ptr=x2, xl_ptr=_placeholder(xl2, x2), w_ptr=w, bias_ptr=_placeholder(bias, x2),
        a_ptr=_placeholder(a, x2), b_ptr=_placeholder(b, x2), s_ptr=_placeholder(scale, x2),
        us_ptr=_placeholder(us, x2), y_ptr=y, u_ptr=_placeholder(u, x2),
        M=m, N=n, K=k, R=r,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        stride_xlm=xl2.stride(0) if xl2 is not None else 0,
        stride_xlk=xl2.stride(1) if xl2 is not None else 0,
        stride_wn=w_strides[0], stride_wk=w_strides[1],
        stride_ar=a_strides[0], stride_ak=a_strides[1],
        stride_bn=b_strides[0], stride_br=b_strides[1],
        stride_sm=s_strides[0], stride_sr=s_strides[1],
        stride_usm=us.stride(0) if us is not None else 0,
        stride_usr=us.stride(1) if us is not None else 0,
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_um=u.stride(0) if u is not None else 0,
        stride_ur=u.stride(1) if u is not None else 0,
        m_bucket=m_bucket(m),
        HAS_BIAS=bias is not None, COMPUTE_U=compute_u, LORA_INPUT=xl2 is not None,
        EXPAND=expand, STORE_U=u is not None, USE_TMA=use_tma,
        W_T=w_strides[1] != 1 and w_strides[0] == 1,
        UPCAST=interpreting() and x2.dtype != torch.float32,
        PRECISION=input_precision(x2.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
    )
    return Launch(_lora_fwd_kernel, (programs,), args, cfg.num_warps, cfg.num_stages)


def forward_plan(x2, weight, bias, lora_a, lora_b, scale, y, u, xl2=None, *, use_tma: bool,
                 cfg: FwdConfig, sms: int, chunks: int | None = None) -> Launch:
    """The forward's Launch: y = x W^T + bias + ((xa A^T) S) B^T, u stored (xa = xl2 or x2)."""
    return plan(x2, weight, weight.stride(), bias, lora_a, lora_a.stride(), lora_b,
                lora_b.stride(), scale, None, y, u, xl2, r=lora_a.shape[0], compute_u=True,
                expand=True, use_tma=use_tma, cfg=cfg, sms=sms, chunks=chunks)


def gemm_plan(x2, weight, bias, lora_b, us, y, *, cfg: FwdConfig, sms: int) -> Launch:
    """The split's second Launch: y = x W^T + bias + us B^T with us given (pointer loads)."""
    return plan(x2, weight, weight.stride(), bias, None, (0, 0), lora_b, lora_b.stride(),
                None, us, y, None, None, r=us.shape[1], compute_u=False, expand=True,
                use_tma=False, cfg=cfg, sms=sms)


def dx_plan(dy2, weight, lora_a, gs, dx, *, use_tma: bool, cfg: FwdConfig, sms: int) -> Launch:
    """dx = dy W + gs A (gs None: dy W alone). This GEMM's "weight" is W read transposed
    (output columns = K, reduction over N), its "lora_b" is A^T."""
    return plan(dy2, weight, (weight.stride(1), weight.stride(0)), None, None, (0, 0),
                lora_a, (lora_a.stride(1), lora_a.stride(0)), None, gs, dx, None, None,
                r=lora_a.shape[0], compute_u=False, expand=gs is not None, use_tma=use_tma,
                cfg=cfg, sms=sms)


def _run(launch: Launch, device: torch.device, fixed_cfg: FwdConfig | None):
    """Runs a Launch: with its own tiles, or through the CUDA autotuner (tiles from META)."""
    if launch.args["USE_TMA"]:
        _set_tma_allocator()
    if fixed_cfg is not None or device.type != "cuda" or not autotune_enabled():
        launch.run()
        return
    from . import triton_autotune
    triton_autotune.run_forward(launch, device)


def _device_facts(device: torch.device, n: int, r: int, cfg: FwdConfig | None,
                  is_aligned: bool, dtype: torch.dtype, tma: bool):
    """(config, SM count) for a launch: the given or default tiles."""
    if device.type != "cuda" or interpreting():
        return cfg or interpreter_config(r), 4
    return cfg or fwd_default(arch_of(device), n, r, is_aligned, dtype, tma), sm_count(device)


def _rows(t, k):
    """t as an (M, K) matrix: row-strided input is read in place, anything else copied once."""
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def forward(x, weight, bias, lora_a, lora_b, scale, lora_input=None,
            cfg: FwdConfig | None = None):
    """y and u (fp32, M x R) of lora_linear on Triton; inputs already validated.

    Decode-sized M (<= DECODE_MAX_M) on CUDA takes the split-K kernel (triton_decode.py);
    a given ``cfg`` fixes the tiles (tests, the static report) and skips autotuning.
    """
    k = x.shape[-1]
    n, r = weight.shape[0], lora_a.shape[0]
    x2 = _rows(x, k)
    xl2 = _rows(lora_input, k) if lora_input is not None else None
    m = x2.shape[0]
    if m <= DECODE_MAX_M and x.device.type == "cuda" and cfg is None:
        from . import triton_decode
        y, u = triton_decode.forward(x2, weight, bias, lora_a, lora_b, scale, xl2)
        return y.view(*x.shape[:-1], n), u
    use_tma = tma_allowed(x.device, x2, xl2, weight, lora_a)
    tiles, sms = _device_facts(x.device, n, r, cfg, aligned(k, n, x2.stride(0),
                                                           weight.stride(0)), x.dtype, use_tma)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    u = torch.empty((m, r), device=x.device, dtype=torch.float32)
    launch = forward_plan(x2, weight, bias, lora_a, lora_b, scale, y, u, xl2, use_tma=use_tma,
                          cfg=tiles, sms=sms)
    _run(launch, x.device, cfg)
    return y.view(*x.shape[:-1], n), u


def expand_into_gemm(x2, weight, bias, lora_b, us, cfg: FwdConfig | None = None):
    """y = x W^T + bias + us B^T with a given rank-R operand us (M x R): the second launch of
    the split alternative (kernels/triton_split.py)."""
    m, k = x2.shape
    n = weight.shape[0]
    is_aligned = aligned(k, n, x2.stride(0), weight.stride(0))
    if cfg is None and x2.device.type == "cuda" and not interpreting():
        cfg_default = gemm_default(arch_of(x2.device), n, us.shape[1], is_aligned, x2.dtype)
        tiles, sms = cfg_default, sm_count(x2.device)
    else:
        tiles, sms = _device_facts(x2.device, n, us.shape[1], cfg, is_aligned, x2.dtype,
                                   tma=False)
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    _run(gemm_plan(x2, weight, bias, lora_b, us, y, cfg=tiles, sms=sms), x2.device, cfg)
    return y


def input_grad(dy2, weight, lora_a, gs, cfg: FwdConfig | None = None):
    """dx = dy W + gs A as one fused launch (the forward kernel with W^T and A^T strides);
    gs=None gives dx = dy W alone (the lora_input backward) from the same kernel."""
    m, n = dy2.shape
    k, r = weight.shape[1], lora_a.shape[0]
    use_tma = tma_allowed(dy2.device, dy2, weight)
    tiles, sms = _device_facts(dy2.device, k, r, cfg, aligned(k, n, dy2.stride(0)), dy2.dtype,
                               use_tma)
    dx = torch.empty((m, k), device=dy2.device, dtype=dy2.dtype)
    launch = dx_plan(dy2, weight, lora_a, gs, dx, use_tma=use_tma, cfg=tiles, sms=sms)
    _run(launch, dy2.device, cfg)
    return dx
