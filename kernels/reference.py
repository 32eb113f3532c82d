"""Pure-PyTorch semantics of ``lora_linear``: the contract, and the oracle of every test.

    x       (..., K)   float32 | float16 | bfloat16 | float64
    weight  (N, K)     dtype of x, frozen
    bias    (N,) or None
    lora_a  (R, K)     the A matrices of all branches stacked (rows)
    lora_b  (N, R)     the B matrices stacked the same way (columns)
    scale   (M, R) or (1, R), float32 (float64 for float64 x); M = prod(x.shape[:-1])
    lora_input  None, or the input of the A branch (shape, dtype, device of x), e.g. dropout(x)

    xl = lora_input if given else x
    u = xl @ lora_a.T                     accumulated in float32 (float64 for float64 x)
    y = x @ weight.T + bias + (u * scale).to(x.dtype) @ lora_b.T          (..., N), dtype of x

``lora_linear`` is written with ordinary differentiable torch ops, so its gradients come from
autograd, independently of the hand-written backward formulas of the fast backends.
``lora_linear_forward`` / ``lora_linear_backward`` spell those formulas out (docs/DESIGN.md §2);
they serve as the op's kernels on devices with no fast backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["accum_dtype", "lora_linear", "lora_linear_forward", "lora_linear_backward"]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype u = x @ A^T is accumulated and scaled in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_linear(x, weight, bias, lora_a, lora_b, scale, lora_input=None):
    """Reference ``y = x W^T + b + ((xl A^T) * scale) B^T`` with autograd for every input."""
    return lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, lora_input)[0]


def lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, lora_input=None):
    """Returns ``(y, u)`` with u = xl A^T in the accumulation dtype (differentiable ops only)."""
    acc = accum_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    xl2 = x2 if lora_input is None else lora_input.reshape(x2.shape)
    u = xl2.to(acc) @ lora_a.to(acc).T
    y = F.linear(x2, weight, bias) + (u * scale).to(x.dtype) @ lora_b.T
    return y.reshape(*x.shape[:-1], weight.shape[0]), u


def lora_linear_backward(dy, x, weight, lora_a, lora_b, scale, u, lora_input, output_mask):
    """The backward formulas of docs/DESIGN.md §2; entries not in ``output_mask`` are empty.

    g = dy B ; gs = g * S ; dx = dy W + gs A ; dA = gs^T x ; dB = dy^T (u * S) ; dS = g * u
    With lora_input (xl): dx = dy W ; d lora_input = gs A ; dA = gs^T xl (x is not read).
    Returns (dx, dA, dB, dS, d lora_input); the last is empty without lora_input.
    """
    need_dx, need_da, need_db, need_ds, need_dl = output_mask
    split = lora_input is not None
    acc = accum_dtype(x.dtype)
    n, k = weight.shape
    dy2 = dy.reshape(-1, n)
    xl2 = (lora_input if split else x).reshape(-1, k)
    g = dy2.to(acc) @ lora_b.to(acc)
    gs = (g * scale).to(x.dtype)
    empty = x.new_empty(0)
    dx = empty
    if need_dx:
        dx = (dy2 @ weight if split else dy2 @ weight + gs @ lora_a).reshape(x.shape)
    dl = (gs @ lora_a).reshape(x.shape) if need_dl and split else empty
    da = gs.T @ xl2 if need_da else empty
    db = dy2.T @ (u * scale).to(x.dtype) if need_db else empty
    if need_ds:
        ds = g * u
        if scale.shape[0] == 1 and ds.shape[0] != 1:
            ds = ds.sum(0, keepdim=True)
    else:
        ds = scale.new_empty(0)
    return dx, da, db, ds, dl
