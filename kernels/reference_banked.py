"""Pure-PyTorch semantics of ``lora_linear_banked``: rows of one call use different adapters.

    x       (..., K)      as in lora_linear (kernels/reference.py); M = prod(x.shape[:-1])
    weight  (N, K), bias (N,) or None
    bank_a  (S, r, K)     S adapters' A matrices (dtype of x)
    bank_b  (S, N, r)     their B matrices
    index   (M, B) int64  row m's branch b uses adapter index[m, b], in [0, S)
    scale   (M, B r) or (1, B r), float32: branch b's factors in columns [b r, (b+1) r)
    dropout_p, dropout_seed   in-op LoRA dropout; dropout_seed (S,) int64, one per adapter

    u[m, b r:(b+1) r] = xl[m] @ bank_a[index[m, b]].T          accumulated in float32
    y[m] = x[m] @ weight.T + bias + sum_b (u_b[m] * S_b[m]).to(x.dtype) @ bank_b[index[m, b]].T

A *segment* is the rows sharing one whole index tuple (one client: its global and its local
adapter), in their order in the call. With in-op dropout a segment's rows are masked as in a
call of their own: ``dropout_keep(M_s, K, p, dropout_seed[its last adapter])``, rows numbered
from 0 within the segment; so a batched step equals each client's step alone. Two segments
with the same last adapter would share that stream, which is refused.

``lora_linear_banked`` uses differentiable torch ops only (the oracle of the tests);
``lora_linear_banked_forward`` / ``_backward`` spell out the formulas of the native kernels
(kernels/cpu/banked_cpu.cpp) and serve devices without a fast backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import accum_dtype, dropout_keep

__all__ = ["bank_segments", "lora_linear_banked", "lora_linear_banked_forward",
           "lora_linear_banked_backward", "scale_gradient"]


def bank_segments(index: torch.Tensor, dropout_p: float = 0.0) -> list[tuple[torch.Tensor, tuple]]:
    """The segments of a call: (rows in call order, the adapter of each branch) per distinct
    index tuple. Under dropout (``dropout_p`` > 0) two segments may not share a last adapter."""
    tuples, inverse = torch.unique(index, dim=0, return_inverse=True)
    segments = [((inverse == g).nonzero().flatten(), tuple(t))
                for g, t in enumerate(tuples.tolist())]
    lasts = [adapters[-1] for _, adapters in segments]
    if dropout_p > 0 and len(set(lasts)) != len(lasts):
        shared = next(a for a in lasts if lasts.count(a) > 1)
        raise ValueError(f"lora_linear_banked: under in-op dropout every row whose last branch "
                         f"uses adapter {shared} must use the same adapters in every branch "
                         f"(one client, one dropout stream)")
    return segments


def scale_gradient(g: torch.Tensor, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d scale = g * u per row, summed over the rows for a shared (1, B r) scale."""
    ds = g * u
    return ds.sum(0, keepdim=True) if scale.shape[0] == 1 and ds.shape[0] != 1 else ds


def _segment_scale(scale, rows):
    return scale if scale.shape[0] == 1 else scale[rows]


def _segment_keep(rows, k, dropout_p, dropout_seed, adapters, device):
    last = adapters[-1]
    return dropout_keep(len(rows), k, dropout_p, dropout_seed[last:last + 1], device)


def lora_linear_banked(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0,
                       dropout_seed=None):
    """Reference banked op with autograd for every floating input."""
    return lora_linear_banked_forward(x, weight, bias, bank_a, bank_b, index, scale, dropout_p,
                                      dropout_seed)[0]


def lora_linear_banked_forward(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0,
                               dropout_seed=None):
    """Returns ``(y, u)``, u (M, B r) in the accumulation dtype (differentiable ops only)."""
    acc = accum_dtype(x.dtype)
    k, r = x.shape[-1], bank_a.shape[1]
    x2 = x.reshape(-1, k)
    u = x2.new_zeros((x2.shape[0], index.shape[1] * r), dtype=acc)
    lora = x2.new_zeros((x2.shape[0], weight.shape[0]))
    for rows, adapters in bank_segments(index, dropout_p):
        xs = x2[rows].to(acc)
        if dropout_p > 0:
            xs = xs * _segment_keep(rows, k, dropout_p, dropout_seed, adapters, x.device)
        us_acc = torch.cat([xs @ bank_a[a].to(acc).T for a in adapters], 1)
        if dropout_p > 0:
            us_acc = us_acc / (1.0 - dropout_p)
        us = (us_acc * _segment_scale(scale, rows)).to(x.dtype)
        lora_s = sum(us[:, b * r:(b + 1) * r] @ bank_b[a].T for b, a in enumerate(adapters))
        u = u.index_copy(0, rows, us_acc)
        lora = lora.index_copy(0, rows, lora_s)
    y = F.linear(x2, weight, bias) + lora
    return y.reshape(*x.shape[:-1], weight.shape[0]), u


def lora_linear_banked_backward(dy, x, weight, bank_a, bank_b, index, scale, u, output_mask,
                                dropout_p=0.0, dropout_seed=None):
    """The backward formulas per segment and branch b (adapter s = index tuple's b-th entry):
    g_b = dy B_s ; gs_b = g_b * S_b ; dx = dy W + sum_b gs_b A_s ; dA_s += gs_b^T xl ;
    dB_s += dy^T (u_b * S_b) ; dS = g * u. Returns (dx, d bank_a, d bank_b, d scale), entries
    not in ``output_mask`` empty; bank gradients are zero for adapters no row used."""
    need_dx, need_da, need_db, need_ds = output_mask
    acc = accum_dtype(x.dtype)
    n, k = weight.shape
    r = bank_a.shape[1]
    dy2, x2 = dy.reshape(-1, n), x.reshape(-1, k)
    g = torch.empty_like(u)
    dx = torch.empty_like(x2) if need_dx else None
    da = torch.zeros_like(bank_a, dtype=acc)
    db = torch.zeros_like(bank_b, dtype=acc)
    inv_keep = 1.0 / (1.0 - dropout_p)
    for rows, adapters in bank_segments(index, dropout_p):
        dys, xs = dy2[rows], x2[rows]
        keep = (_segment_keep(rows, k, dropout_p, dropout_seed, adapters, x.device)
                if dropout_p > 0 else None)
        g_s = torch.cat([dys.to(acc) @ bank_b[a].to(acc) for a in adapters], 1)
        ss = _segment_scale(scale, rows)
        gs = (g_s * ss * inv_keep if keep is not None else g_s * ss).to(x.dtype)
        us = (u[rows] * ss).to(x.dtype)
        xl = xs * keep if keep is not None else xs
        dx_s = torch.zeros_like(xs)
        for b, a in enumerate(adapters):
            gs_b = gs[:, b * r:(b + 1) * r]
            dx_s = dx_s + gs_b @ bank_a[a]
            da[a] += (gs_b.T @ xl).to(acc)
            db[a] += (dys.T @ us[:, b * r:(b + 1) * r]).to(acc)
        if need_dx:
            dx[rows] = (dx_s * keep if keep is not None else dx_s)
        g[rows] = g_s
    empty = x.new_empty(0)
    if need_ds:
        ds = scale_gradient(g, u, scale)
    return (
        (dx + dy2 @ weight).reshape(x.shape) if need_dx else empty,
        da.to(x.dtype) if need_da else empty,
        db.to(x.dtype) if need_db else empty,
        ds if need_ds else scale.new_empty(0),
    )
