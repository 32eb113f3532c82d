"""Triton kernels of the banked op (lora_linear_banked: rows of one call use different adapters
of a bank; the contract is kernels/reference_banked.py). The frozen GEMM is the plain op's
(kernels/triton_gemm.py, once over all M rows); these two kernels do the rank-r work.

A *block* is up to BLOCK_M rows of one segment (the rows sharing one whole index tuple: one
client), found through the call's row order and block table (kernels/triton_banked_segments.py).
A block's B branches read B adapters; stacked, they are one rank-J matrix (J = B r), as the
plain op stacks its branches: column j = b r + i of the block is row i of adapter
index[row, b]. Each program gathers its rows (pointer loads through the row order) and its
stacked adapter (one base offset per column j), so one tl.dot covers every branch:

    shrink  out[m, j] = sum_l src[m, l] T_j[l]              fp32 (BLOCK_M x BLOCK_J)
            forward:  src = x (masked under in-op dropout), T_j = A rows,  out = u
            backward: src = dy,                               T_j = B cols,  out = g
                      and, NEED_DBANK, d bank_b[s_j][l, i] += sum_m dy[m, l] us[m, j]
    expand  out[m, c] += sum_j (v[m, j] S[m, j] factor).to(dtype) T_j[c]
            forward:  v = u, T_j = B cols, out = y (the frozen GEMM's output)
            backward: v = g, T_j = A rows, out = dx (dy W), factor = 1 / (1 - p), the term
                      masked under dropout; NEED_DBANK: d bank_a[s_j][i, c] += sum_m gs xl

The bank gradients are fp32 atomic adds into zeroed (S, ., .) buffers, one per block that uses
an adapter: adapters no row used stay zero, a shared global sums every client's rows (in an
order that varies from run to run in the last bits, as the plain op's dB and dA).
In-op dropout: rows are numbered from 0 within their segment (the block table's ``local``) and
the seed is dropout_seed[the block's last adapter], so each client gets the mask of a call of
its own (kernels/triton_dropout.keep_mask: the CPU's mask bit for bit).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .triton_config import input_precision, interpreting, operand_class, padded_rank
from .triton_dropout import InOpDropout, keep_mask
from .triton_launch import Launch


@triton.jit
def _block_rows(table_ptr, order_ptr, BLOCK_M: tl.constexpr):
    """This program's rows: (row ids, valid lanes, the block's first row, segment-local row
    numbers). Invalid lanes point at the first row (every access to them is masked)."""
    blk = tl.program_id(0)
    start = tl.load(table_ptr + blk * 3)
    count = tl.load(table_ptr + blk * 3 + 1)
    local = tl.load(table_ptr + blk * 3 + 2)
    lanes = tl.arange(0, BLOCK_M)
    valid = lanes < count
    first = tl.load(order_ptr + start)
    rows = tl.load(order_ptr + start + lanes, mask=valid, other=first)
    return rows.to(tl.int64), valid, first.to(tl.int64), local + lanes


@triton.jit
def _stacked_columns(index_ptr, first, stride_im, stride_ib, J, RANK,
                     stride_s, stride_r, BLOCK_J: tl.constexpr):
    """Offsets of the block's stacked adapter: column j = b r + i is row i of adapter
    index[first, b] (stride_s over adapters, stride_r over the rank)."""
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < J
    adapter = tl.load(index_ptr + first * stride_im + (offs_j // RANK) * stride_ib,
                      mask=mask_j, other=0)
    return adapter * stride_s + (offs_j % RANK) * stride_r, offs_j, mask_j


@triton.jit
def _block_seed(index_ptr, seed_ptr, first, stride_im, stride_ib, J, RANK):
    """The segment's dropout seed: that of its last branch's adapter."""
    last = tl.load(index_ptr + first * stride_im + (J // RANK - 1) * stride_ib)
    return tl.load(seed_ptr + last)


@triton.jit
def _banked_shrink_kernel(
    # pointers
    src_ptr, bank_ptr, table_ptr, order_ptr, index_ptr, out_ptr,
    v_ptr, s_ptr, dbank_ptr, seed_ptr,
    # sizes (src is M x L; J = B r stacked rank columns of rank RANK each)
    L, J, RANK,
    # strides (the bank as (S, rank, L); its gradient buffer the same way)
    stride_srcm, stride_srcl, stride_bs, stride_br, stride_bl, stride_im, stride_ib,
    stride_om, stride_oj, stride_vm, stride_vj, stride_sm, stride_sj,
    stride_dbs, stride_dbr, stride_dbl,
    # in-op dropout: keep when (random >> 1) >= drop_threshold; out scaled by drop_scale
    drop_threshold, drop_scale,
    # modes
    MASK_SRC: tl.constexpr,    # src under the segment's dropout mask (the forward's x)
    NEED_DBANK: tl.constexpr,  # d bank += src^T (v S).to(dtype) (the backward's d bank_b)
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr,
):
    rows, valid, first, local = _block_rows(table_ptr, order_ptr, BLOCK_M)
    cols, offs_j, mask_j = _stacked_columns(index_ptr, first, stride_im, stride_ib, J, RANK,
                                            stride_bs, stride_br, BLOCK_J)
    mask_mj = valid[:, None] & mask_j[None, :]
    seed = 0
    if MASK_SRC:
        seed = _block_seed(index_ptr, seed_ptr, first, stride_im, stride_ib, J, RANK)
    if NEED_DBANK:
        dcols, _, _ = _stacked_columns(index_ptr, first, stride_im, stride_ib, J, RANK,
                                       stride_dbs, stride_dbr, BLOCK_J)
        v = tl.load(v_ptr + rows[:, None] * stride_vm + offs_j[None, :] * stride_vj,
                    mask=mask_mj, other=0.0)
        s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_j[None, :] * stride_sj,
                    mask=mask_mj, other=0.0)
        vs = (v * s).to(bank_ptr.dtype.element_ty)
        if UPCAST:
            vs = vs.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ll = l0 + tl.arange(0, BLOCK_L)
        mask_l = ll < L
        src = tl.load(src_ptr + rows[:, None] * stride_srcm + ll[None, :] * stride_srcl,
                      mask=valid[:, None] & mask_l[None, :], other=0.0)
        t = tl.load(bank_ptr + cols[None, :] + ll[:, None] * stride_bl,
                    mask=mask_l[:, None] & mask_j[None, :], other=0.0)
        if MASK_SRC:
            src = tl.where(keep_mask(seed, local, ll, drop_threshold), src, 0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (docs/ARCHITECTURE.md §1)
            src = src.to(tl.float32)
            t = t.to(tl.float32)
        acc = tl.dot(src, t, acc, input_precision=PRECISION)
        if NEED_DBANK:
            d = tl.dot(tl.trans(src), vs, input_precision=PRECISION)  # (BLOCK_L, BLOCK_J)
            tl.atomic_add(dbank_ptr + dcols[None, :] + ll[:, None] * stride_dbl, d,
                          mask=mask_l[:, None] & mask_j[None, :])
    if MASK_SRC:
        acc = acc * drop_scale
    tl.store(out_ptr + rows[:, None] * stride_om + offs_j[None, :] * stride_oj, acc,
             mask=mask_mj)


@triton.jit
def _banked_expand_kernel(
    # pointers
    v_ptr, s_ptr, bank_ptr, table_ptr, order_ptr, index_ptr, out_ptr,
    x_ptr, dbank_ptr, seed_ptr,
    # sizes (out is M x C; J = B r stacked rank columns of rank RANK each)
    C, J, RANK,
    # strides (the bank as (S, rank, C); its gradient buffer the same way)
    stride_vm, stride_vj, stride_sm, stride_sj, stride_bs, stride_br, stride_bc,
    stride_im, stride_ib, stride_om, stride_oc, stride_xm, stride_xc,
    stride_dbs, stride_dbr, stride_dbc,
    # v S factor is cast to the operands' dtype; in-op dropout keeps (random >> 1) >= threshold
    factor, drop_threshold,
    # modes
    NEED_OUT: tl.constexpr,    # out += the rank-r term (y, or dx)
    NEED_DBANK: tl.constexpr,  # d bank += xl^T (v S factor) (the backward's d bank_a)
    MASK: tl.constexpr,        # the term and x under the segment's dropout mask
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    rows, valid, first, local = _block_rows(table_ptr, order_ptr, BLOCK_M)
    cols, offs_j, mask_j = _stacked_columns(index_ptr, first, stride_im, stride_ib, J, RANK,
                                            stride_bs, stride_br, BLOCK_J)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_mj = valid[:, None] & mask_j[None, :]
    mask_mc = valid[:, None] & mask_c[None, :]
    v = tl.load(v_ptr + rows[:, None] * stride_vm + offs_j[None, :] * stride_vj,
                mask=mask_mj, other=0.0)
    s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_j[None, :] * stride_sj,
                mask=mask_mj, other=0.0)
    vs = (v * s * factor).to(bank_ptr.dtype.element_ty)
    if UPCAST:
        vs = vs.to(tl.float32)
    if MASK:
        seed = _block_seed(index_ptr, seed_ptr, first, stride_im, stride_ib, J, RANK)
        keep = keep_mask(seed, local, offs_c, drop_threshold)
    if NEED_OUT:
        t = tl.load(bank_ptr + cols[:, None] + offs_c[None, :] * stride_bc,
                    mask=mask_j[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
        term = tl.dot(vs, t, input_precision=PRECISION)
        if MASK:
            term = tl.where(keep, term, 0.0)
        ptrs = out_ptr + rows[:, None] * stride_om + offs_c[None, :] * stride_oc
        out = tl.load(ptrs, mask=mask_mc, other=0.0).to(tl.float32)
        tl.store(ptrs, (out + term).to(out_ptr.dtype.element_ty), mask=mask_mc)
    if NEED_DBANK:
        dcols, _, _ = _stacked_columns(index_ptr, first, stride_im, stride_ib, J, RANK,
                                       stride_dbs, stride_dbr, BLOCK_J)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                    mask=mask_mc, other=0.0)
        if MASK:
            x = tl.where(keep, x, 0.0)
        if UPCAST:
            x = x.to(tl.float32)
        # d^T tile = xl^T vs: the C tile is the dot's M side (wgmma needs >= 64 there)
        d = tl.dot(tl.trans(x), vs, input_precision=PRECISION)
        tl.atomic_add(dbank_ptr + dcols[None, :] + offs_c[:, None] * stride_dbc, d,
                      mask=mask_c[:, None] & mask_j[None, :])


@dataclasses.dataclass(frozen=True)
class BankedTiles:
    """Fixed tiles of the two banked kernels (not autotuned): rows per block, the shrink's
    reduction step, the expand's column tile, and the warps / stages of each."""

    block_m: int
    block_l: int
    block_c: int
    shrink_warps: int = 4
    shrink_stages: int = 3
    expand_warps: int = 4

    def label(self, kernel: str) -> str:
        if kernel == "shrink":
            return f"{self.block_m}x{self.block_l} w{self.shrink_warps} s{self.shrink_stages}"
        return f"{self.block_m}x{self.block_c} w{self.expand_warps} s1"


def banked_tiles(m: int, dtype: torch.dtype, dropout: bool, j: int,
                 is_aligned: bool) -> BankedTiles:
    """The tiles of one call (``j`` stacked rank columns; ``is_aligned``: K, N and the row
    strides multiples of 16). 64-row blocks (wgmma's minimum M on Hopper) for prefill, 16 (the
    smallest dot) at decode-sized M; 4-byte operands and the dropout mask (4 Philox words per
    element of the tile) take half-depth shrink steps. Unaligned shapes (element-wise loads)
    take 64 x 32 shrink steps at 8 warps (64 x 64 w4 with d bank_b: 255 registers on 3.9,
    32-320 B spilled on 3.6, sm_80 and sm_90a). The expand takes 64 columns and 8 warps where
    64 x 128 at 4 spilled (static gate, Triton 3.9): under the mask (392 B on sm_90a), at
    unaligned shapes (sm_80 and sm_90a), and J padded to 64."""
    if interpreting():
        return BankedTiles(16, 32, 32, 4, 1, 4)
    block_m = 16 if m <= 64 else 64
    cls = operand_class(dtype)
    wide = padded_rank(j) >= 64
    if cls == "fp32":  # FMA dots: the operand tiles live in registers; J = 64 takes 16-row
        # blocks at 8 warps (32 x 32 spilled 104-2304 B at 2, 4 and 8 warps on sm_90a)
        return BankedTiles(16 if wide else min(block_m, 32), 32, 32, 4, 1, 8 if wide else 4)
    block_l = 32 if (dropout or cls == "tf32" or not is_aligned) else 64
    narrow = dropout or not is_aligned or cls == "tf32"
    return BankedTiles(block_m, block_l, 64 if narrow else 128, 4 if is_aligned else 8, 3,
                       8 if (narrow or wide) else 4)


@dataclasses.dataclass(frozen=True)
class BankView:
    """A bank (or its fp32 gradient buffer) as the kernels read it: (adapter, rank, long)
    strides, the long side being K for bank_a (S, r, K) and N for bank_b (S, N, r)."""

    tensor: torch.Tensor
    strides: tuple
    rank: int


def a_view(bank_a) -> BankView:
    return BankView(bank_a, (bank_a.stride(0), bank_a.stride(1), bank_a.stride(2)),
                    bank_a.shape[1])


def b_view(bank_b) -> BankView:
    return BankView(bank_b, (bank_b.stride(0), bank_b.stride(2), bank_b.stride(1)),
                    bank_b.shape[2])


def _mode_args(dtype):
    return dict(UPCAST=interpreting() and dtype != torch.float32,
                PRECISION=input_precision(dtype))


def shrink_plan(src, bank: BankView, order, table, index, out, *, tiles: BankedTiles,
                v=None, scale=None, dbank: BankView | None = None,
                dropout: InOpDropout | None = None, dropout_seed=None) -> Launch:
    """out (M x J, fp32) = src T^T per block; ``dbank`` (fp32) receives src^T (v S).to(dtype)
    when given; ``dropout`` masks src with the per-adapter seeds ``dropout_seed`` (S,)."""
    need_dbank = dbank is not None
    db = dbank.strides if need_dbank else (0, 0, 0)
    args = dict(
        src_ptr=src, bank_ptr=bank.tensor, table_ptr=table, order_ptr=order, index_ptr=index,
        out_ptr=out, v_ptr=v if need_dbank else out, s_ptr=scale if need_dbank else out,
        dbank_ptr=dbank.tensor if need_dbank else out,
        seed_ptr=dropout_seed if dropout is not None else index,
        L=src.shape[1], J=out.shape[1], RANK=bank.rank,
        stride_srcm=src.stride(0), stride_srcl=src.stride(1),
        stride_bs=bank.strides[0], stride_br=bank.strides[1], stride_bl=bank.strides[2],
        stride_im=index.stride(0), stride_ib=index.stride(1),
        stride_om=out.stride(0), stride_oj=out.stride(1),
        stride_vm=v.stride(0) if need_dbank else 0, stride_vj=v.stride(1) if need_dbank else 0,
        stride_sm=_row_stride(scale) if need_dbank else 0,
        stride_sj=scale.stride(1) if need_dbank else 0,
        stride_dbs=db[0], stride_dbr=db[1], stride_dbl=db[2],
        drop_threshold=dropout.threshold if dropout is not None else 0,
        drop_scale=dropout.scale if dropout is not None else 1.0,
        MASK_SRC=dropout is not None, NEED_DBANK=need_dbank, **_mode_args(src.dtype),
        BLOCK_M=tiles.block_m, BLOCK_L=tiles.block_l, BLOCK_J=padded_rank(out.shape[1]),
    )
    return Launch(_banked_shrink_kernel, (table.shape[0],), args, tiles.shrink_warps,
                  tiles.shrink_stages)


def expand_plan(v, scale, bank: BankView, order, table, index, out, *, tiles: BankedTiles,
                columns: int, factor: float = 1.0, x=None, dbank: BankView | None = None,
                dropout: InOpDropout | None = None, dropout_seed=None) -> Launch:
    """out (M x columns) += (v S factor).to(dtype) T per block (``out`` None: no such term);
    ``dbank`` (fp32) receives xl^T (v S factor).to(dtype) when given; ``dropout`` masks the
    term and x with the per-adapter seeds ``dropout_seed`` (S,)."""
    need_out, need_dbank = out is not None, dbank is not None
    db = dbank.strides if need_dbank else (0, 0, 0)
    args = dict(
        v_ptr=v, s_ptr=scale, bank_ptr=bank.tensor, table_ptr=table, order_ptr=order,
        index_ptr=index, out_ptr=out if need_out else v, x_ptr=x if need_dbank else v,
        dbank_ptr=dbank.tensor if need_dbank else v,
        seed_ptr=dropout_seed if dropout is not None else index,
        C=columns, J=v.shape[1], RANK=bank.rank,
        stride_vm=v.stride(0), stride_vj=v.stride(1),
        stride_sm=_row_stride(scale), stride_sj=scale.stride(1),
        stride_bs=bank.strides[0], stride_br=bank.strides[1], stride_bc=bank.strides[2],
        stride_im=index.stride(0), stride_ib=index.stride(1),
        stride_om=out.stride(0) if need_out else 0, stride_oc=out.stride(1) if need_out else 0,
        stride_xm=x.stride(0) if need_dbank else 0, stride_xc=x.stride(1) if need_dbank else 0,
        stride_dbs=db[0], stride_dbr=db[1], stride_dbc=db[2],
        factor=float(factor), drop_threshold=dropout.threshold if dropout is not None else 0,
        NEED_OUT=need_out, NEED_DBANK=need_dbank, MASK=dropout is not None,
        **_mode_args(bank.tensor.dtype),
        BLOCK_M=tiles.block_m, BLOCK_C=tiles.block_c, BLOCK_J=padded_rank(v.shape[1]),
    )
    grid = (table.shape[0], triton.cdiv(columns, tiles.block_c))
    return Launch(_banked_expand_kernel, grid, args, tiles.expand_warps, 1)


def _row_stride(scale) -> int:
    """scale (M, J) or (1, J): a single row broadcasts to every row."""
    return 0 if scale.shape[0] == 1 else scale.stride(0)
