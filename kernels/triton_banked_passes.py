"""Forward and backward of the banked op on Triton (kernels/triton_banked.py has the kernels and
the math; kernels/triton_op.py registers these as the op family's kernels).

    forward   y = x W^T + bias             the GEMM kernel (kernels/triton_gemm.py), all M rows
              u = xl T_A^T per block       banked shrink (fp32, masked under in-op dropout)
              y += (u S).to(dtype) T_B     banked expand, into the GEMM's output
    backward  g = dy T_B^T per block       banked shrink; d bank_b += dy^T (u S) in the same pass
              dx = dy W                    the GEMM kernel (W read reduction-major)
              dx += (g S c).to(dtype) T_A  banked expand (masked under dropout, c = 1 / (1 - p));
                                           d bank_a += xl^T (g S c) in the same pass
              d scale = g * u              (summed over rows for a (1, B r) scale)

Three launches each way (plus the row grouping, kernels/triton_banked_segments.py). The
frozen GEMM takes the prefill GEMM's tiles (autotuned on CUDA like dx) and, at decode-sized M,
the decode kernel's tiles on the same GEMM kernel (no split-K: docs/gpu.md, Banks).
"""
from __future__ import annotations

import torch

from . import triton_gemm
from .reference_banked import scale_gradient
from .triton_autotune import run_tuned
from .triton_banked import a_view, b_view, banked_tiles, expand_plan, shrink_plan
from .triton_banked_segments import bank_blocks
from .triton_config import (
    DECODE_MAX_M,
    FwdConfig,
    aligned,
    arch_of,
    decode_default,
    interpreting,
    sm_count,
)
from .triton_dropout import InOpDropout
from .triton_launch import device_facts, matrix_rows, tma_allowed

# The GEMM kernel's rank-R operand is off (EXPAND = False): its BLOCK_R only sizes an unused
# zero tile, kept at the smallest dot size.
_NO_RANK = 16


def gemm_tiles(device: torch.device, m: int, cols: int, is_aligned: bool, dtype: torch.dtype,
               use_tma: bool) -> tuple[FwdConfig, int, bool]:
    """(tiles, SMs, fixed) of the frozen GEMM: decode-sized M takes the decode kernel's tiles,
    fixed (more column tiles in flight than the prefill tiles give); larger M the GEMM
    kernel's default, which the CUDA autotuner may replace (``fixed`` False)."""
    if device.type == "cuda" and not interpreting() and m <= DECODE_MAX_M:
        cfg = decode_default(arch_of(device), m, _NO_RANK, is_aligned, dtype)
        return cfg, sm_count(device), True
    tiles, sms = device_facts(device, cols, _NO_RANK, None, is_aligned, dtype, use_tma,
                              gemm=True)
    return tiles, sms, device.type != "cuda" or interpreting()


def gemm_plan(a2, weight, bias, out, *, w_t: bool, cfg: FwdConfig, sms: int, use_tma: bool):
    """The Launch of out = a2 W^T + bias (``w_t`` False: the forward) or out = a2 W (``w_t``:
    dx, W read reduction-major) on the GEMM kernel, its expand off."""
    w_strides = (weight.stride(1), weight.stride(0)) if w_t else weight.stride()
    return triton_gemm.plan(a2, weight, w_strides, w_t, bias, None, (0, 0), None, out,
                            r=_NO_RANK, use_tma=use_tma, cfg=cfg, sms=sms)


def frozen_gemm(a2, weight, bias, *, w_t: bool):
    """a2 W^T + bias, or a2 W (``w_t``), in a2's dtype."""
    m, red = a2.shape
    cols = weight.shape[1] if w_t else weight.shape[0]
    use_tma = tma_allowed(a2.device, a2, weight)
    is_aligned = aligned(red, cols, a2.stride(0), weight.stride(0))
    cfg, sms, fixed = gemm_tiles(a2.device, m, cols, is_aligned, a2.dtype, use_tma)
    out = torch.empty((m, cols), device=a2.device, dtype=a2.dtype)
    launch = gemm_plan(a2, weight, bias, out, w_t=w_t, cfg=cfg, sms=sms, use_tma=use_tma)
    run_tuned(launch, a2.device, cfg if fixed else None, computes_u=False)
    return out


def _aligned(weight, *rows) -> bool:
    """K, N and the row strides multiples of 16 elements (Triton's divisibility hint)."""
    return aligned(*weight.shape, weight.stride(0), *(t.stride(0) for t in rows))


def _dropout(dropout_p: float, dropout_seed):
    """(the mask's threshold and 1 / (1 - p), the (S,) seeds as the kernels index them)."""
    if dropout_p <= 0:
        return None, None
    return InOpDropout(float(dropout_p), torch.empty(0)), dropout_seed.contiguous()


def forward(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0, dropout_seed=None):
    """(y, u) of lora_linear_banked, inputs already checked; u (M, B r) fp32."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = matrix_rows(x, k)
    m, j = x2.shape[0], index.shape[1] * bank_a.shape[1]
    dropout, dropout_seed = _dropout(dropout_p, dropout_seed)
    tiles = banked_tiles(m, x.dtype, dropout is not None, j, _aligned(weight, x2))
    blocks = bank_blocks(index, bank_a.shape[0], tiles.block_m, dropout is not None)
    u = torch.empty((m, j), device=x.device, dtype=torch.float32)
    if m == 0:
        return x.new_empty((*x.shape[:-1], n)), u
    y = frozen_gemm(x2, weight, bias, w_t=False)
    shrink_plan(x2, a_view(bank_a), blocks.order, blocks.table, index, u, tiles=tiles,
                dropout=dropout, dropout_seed=dropout_seed).run()
    expand_plan(u, scale, b_view(bank_b), blocks.order, blocks.table, index, y, tiles=tiles,
                columns=n).run()
    return y.view(*x.shape[:-1], n), u


def backward(dy, x, weight, bank_a, bank_b, index, scale, u, output_mask, dropout_p=0.0,
             dropout_seed=None):
    """(dx, d bank_a, d bank_b, d scale); entries not in ``output_mask`` are empty tensors.
    Bank gradients are zero for adapters no row used."""
    need_dx, need_da, need_db, need_ds = output_mask
    n, k = weight.shape
    dy2, x2 = matrix_rows(dy, n), matrix_rows(x, k)
    m = dy2.shape[0]
    dropout, dropout_seed = _dropout(dropout_p, dropout_seed)
    tiles = banked_tiles(m, x.dtype, dropout is not None, u.shape[1],
                         _aligned(weight, x2, dy2))
    blocks = bank_blocks(index, bank_a.shape[0], tiles.block_m, dropout is not None)
    g = torch.empty_like(u)
    db32 = torch.zeros(bank_b.shape, device=x.device, dtype=torch.float32) if need_db else None
    da32 = torch.zeros(bank_a.shape, device=x.device, dtype=torch.float32) if need_da else None
    dx = frozen_gemm(dy2, weight, None, w_t=True) if need_dx and m else None
    if m:
        shrink_plan(dy2, b_view(bank_b), blocks.order, blocks.table, index, g, tiles=tiles,
                    v=u, scale=scale, dbank=b_view(db32) if need_db else None).run()
    if m and (need_dx or need_da):
        expand_plan(g, scale, a_view(bank_a), blocks.order, blocks.table, index, dx,
                    tiles=tiles, columns=k, factor=dropout.scale if dropout else 1.0,
                    x=x2 if need_da else None, dbank=a_view(da32) if need_da else None,
                    dropout=dropout, dropout_seed=dropout_seed).run()
    empty = x.new_empty(0)
    ds = scale_gradient(g, u, scale) if need_ds else scale.new_empty(0)
    return (
        (dx if dx is not None else x.new_zeros((0, k))).view(x.shape) if need_dx else empty,
        da32.to(x.dtype) if need_da else empty,
        db32.to(x.dtype) if need_db else empty,
        ds,
    )
