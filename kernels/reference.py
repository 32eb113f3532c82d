"""Pure-PyTorch semantics of ``lora_linear``: the contract, and the oracle of every test.

    x       (..., K)   float32 | float16 | bfloat16 | float64
    weight  (N, K)     dtype of x, frozen
    bias    (N,) or None
    lora_a  (R, K)     the A matrices of all branches stacked (rows)
    lora_b  (N, R)     the B matrices stacked the same way (columns)
    scale   (M, R) or (1, R), float32 (float64 for float64 x); M = prod(x.shape[:-1])
    dropout_p, dropout_seed   in-op LoRA dropout: p in [0, 1) and an int64 one-element tensor

    xl = x * keep / (1 - p) with in-op dropout; else x
    u = xl @ lora_a.T                     accumulated in float32 (float64 for float64 x)
    y = x @ weight.T + bias + (u * scale).to(x.dtype) @ lora_b.T          (..., N), dtype of x

With in-op dropout, keep = ``dropout_keep(M, K, p, seed)`` (the Philox mask that every backend
generates, docs/ARCHITECTURE.md "LoRA dropout"); the zeros are applied to x in the accumulation
dtype and 1 / (1 - p) to u, so u = ((x * keep) A^T) / (1 - p).

``lora_linear`` is written with ordinary differentiable torch ops, so its gradients come from
autograd, independently of the hand-written backward formulas of the fast backends.
``lora_linear_forward`` / ``lora_linear_backward`` spell those formulas out
(docs/ARCHITECTURE.md §1); they serve as the op's kernels on devices with no fast backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["accum_dtype", "dropout_keep", "lora_linear", "lora_linear_forward",
           "lora_linear_backward"]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype u = x @ A^T is accumulated and scaled in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep(rows: int, cols: int, p: float, seed: torch.Tensor,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The in-op dropout's keep mask of an (rows, cols) input, bool, on ``device``.

    Args:
        rows, cols: the input seen as a matrix (M = prod of x's leading dims, K).
        p: the drop probability in [0, 1).
        seed: the int64 one-element tensor the op was given (any device).
        device: where the mask is returned.
    Returns:
        (rows, cols) bool tensor, True where x is kept; generated on the CPU (the Triton kernels
        generate the same Philox stream: tests/kernels/test_dropout.py checks it under the
        interpreter).
    """
    keep = torch.ops.feddpa.dropout_keep_mask(rows, cols, float(p), seed.detach().cpu())
    return keep.to(device)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, dropout_seed=None):
    """Reference ``y = x W^T + b + ((xl A^T) * scale) B^T`` with autograd for every input."""
    return lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                               dropout_seed)[0]


def _masked_rows(x2, dropout_p, dropout_seed):
    """x2 * keep in the accumulation dtype (differentiable in x2)."""
    keep = dropout_keep(x2.shape[0], x2.shape[1], dropout_p, dropout_seed, x2.device)
    return x2.to(accum_dtype(x2.dtype)) * keep


def lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0,
                        dropout_seed=None):
    """Returns ``(y, u)`` with u = xl A^T in the accumulation dtype (differentiable ops only)."""
    acc = accum_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if dropout_p > 0:
        u = (_masked_rows(x2, dropout_p, dropout_seed) @ lora_a.to(acc).T) / (1.0 - dropout_p)
    else:
        u = x2.to(acc) @ lora_a.to(acc).T
    y = F.linear(x2, weight, bias) + (u * scale).to(x.dtype) @ lora_b.T
    return y.reshape(*x.shape[:-1], weight.shape[0]), u


def lora_linear_backward(dy, x, weight, lora_a, lora_b, scale, u, output_mask, dropout_p=0.0,
                         dropout_seed=None):
    """The backward formulas of docs/ARCHITECTURE.md §1; entries not in ``output_mask`` are empty.

    g = dy B ; gs = g * S ; dx = dy W + gs A ; dA = gs^T x ; dB = dy^T (u * S) ; dS = g * u
    With in-op dropout: gs = g * S / (1 - p) ; dx = dy W + (gs A) * keep ; dA = gs^T (x * keep).
    Returns (dx, dA, dB, dS).
    """
    need_dx, need_da, need_db, need_ds = output_mask
    acc = accum_dtype(x.dtype)
    n, k = weight.shape
    dy2 = dy.reshape(-1, n)
    x2 = x.reshape(-1, k)
    g = dy2.to(acc) @ lora_b.to(acc)
    drop = dropout_p > 0
    gs = (g * scale / (1.0 - dropout_p) if drop else g * scale).to(x.dtype)
    keep = dropout_keep(*x2.shape, dropout_p, dropout_seed, x.device) if drop else None
    empty = x.new_empty(0)
    dx = empty
    if need_dx:
        lora_term = (gs @ lora_a) * keep if drop else gs @ lora_a
        dx = (dy2 @ weight + lora_term).reshape(x.shape)
    da = empty
    if need_da:
        da = gs.T @ (x2 * keep) if drop else gs.T @ x2
    db = dy2.T @ (u * scale).to(x.dtype) if need_db else empty
    if need_ds:
        ds = g * u
        if scale.shape[0] == 1 and ds.shape[0] != 1:
            ds = ds.sum(0, keepdim=True)
    else:
        ds = scale.new_empty(0)
    return dx, da, db, ds
