"""Glue between the Triton kernels and the op: the CUDA kernels of the feddpa::lora_linear
family (autograd stays the C++ kernel, which calls lora_linear_fwd / lora_linear_bwd), and a
Python autograd.Function used when the Triton backend is forced on CPU tensors under
TRITON_INTERPRET=1 (the interpreter tests).

Import this module only with triton installed; feddpa_fast.kernels imports it lazily.
"""
from __future__ import annotations

import contextlib

import torch

from . import triton_backward, triton_dropout, triton_forward, triton_split


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _fwd(x, weight, bias, lora_a, lora_b, scale, lora_input=None, dropout_p=0.0,
         dropout_seed=None):
    torch.ops.feddpa.lora_linear_check(x, weight, bias, lora_a, lora_b, scale, lora_input,
                                       dropout_p, dropout_seed)
    dropout = triton_dropout.from_op_args(dropout_p, dropout_seed)
    with _on_device(x):
        if dropout is not None:  # the shrink applies the mask (kernels/triton_split.py)
            return triton_split.forward(x, weight, bias, lora_a, lora_b, scale, dropout)
        return triton_forward.forward(x, weight, bias, lora_a, lora_b, scale, lora_input)


def _bwd(dy, x, weight, lora_a, lora_b, scale, u, lora_input, output_mask, dropout_p=0.0,
         dropout_seed=None):
    dropout = triton_dropout.from_op_args(dropout_p, dropout_seed)
    with _on_device(dy):
        return triton_backward.backward(dy, x, weight, lora_a, lora_b, scale, u, lora_input,
                                        list(output_mask), dropout=dropout)


def register_cuda_kernels() -> None:
    """Makes Triton the CUDA implementation of the op family (idempotent)."""
    if getattr(register_cuda_kernels, "_done", False):
        return
    torch.library.impl("feddpa::lora_linear_fwd", "CUDA")(_fwd)
    torch.library.impl("feddpa::lora_linear_bwd", "CUDA")(_bwd)
    torch.library.impl("feddpa::lora_linear", "CUDA")(lambda *a, **kw: _fwd(*a, **kw)[0])
    register_cuda_kernels._done = True


class TritonLoraLinear(torch.autograd.Function):
    """Autograd over the Triton launchers, for the forced backend on any device."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, lora_input=None, dropout_p=0.0,
                dropout_seed=None):
        y, u = _fwd(x, weight, bias, lora_a, lora_b, scale, lora_input, dropout_p, dropout_seed)
        # As in the C++ autograd kernel: with lora_input only it is saved (dA reads it; x is
        # needed by no gradient). It stands in for x in the backward call (same shape, dtype).
        # In-op dropout saves x and the one-element seed the mask is regenerated from.
        ctx.save_for_backward(x if lora_input is None else lora_input, weight, lora_a, lora_b,
                              scale, u, dropout_seed if dropout_p > 0 else None)
        ctx.has_bias = bias is not None
        ctx.has_lora_input = lora_input is not None
        ctx.dropout_p = dropout_p
        return y

    @staticmethod
    def backward(ctx, dy):
        xl, weight, lora_a, lora_b, scale, u, seed = ctx.saved_tensors
        need = ctx.needs_input_grad  # one entry per forward argument, None ones included
        mask = [need[0], need[3], need[4], need[5], ctx.has_lora_input and need[6]]
        lora_input = xl if ctx.has_lora_input else None
        dx, da, db, ds, dl = _bwd(dy, xl, weight, lora_a, lora_b, scale, u, lora_input, mask,
                                  ctx.dropout_p, seed)
        dbias = dy.reshape(-1, weight.shape[0]).sum(0) if ctx.has_bias and need[2] else None
        return (dx if mask[0] else None, None, dbias, da if mask[1] else None,
                db if mask[2] else None, ds if mask[3] else None, dl if mask[4] else None,
                None, None)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, lora_input=None, dropout_p=0.0,
                dropout_seed=None):
    """The op on the Triton kernels, with autograd, on the device of x."""
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("lora_linear: weight must be frozen (requires_grad=False); the op "
                         "never computes a gradient for it")
    return TritonLoraLinear.apply(x, weight, bias, lora_a, lora_b, scale, lora_input, dropout_p,
                                  dropout_seed)


class _AlternativeForward(torch.autograd.Function):
    """A measured alternative forward (returning y and u) with the regular Triton backward."""

    @staticmethod
    def forward(ctx, forward_fn, x, weight, bias, lora_a, lora_b, scale):
        with _on_device(x):
            y, u = forward_fn(x, weight, bias, lora_a, lora_b, scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, scale, u)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, scale, u = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[1], need[4], need[5], need[6], False]
        dx, da, db, ds, _ = _bwd(dy, x, weight, lora_a, lora_b, scale, u, None, mask)
        dbias = dy.reshape(-1, weight.shape[0]).sum(0) if ctx.has_bias and need[3] else None
        return (None, dx if mask[0] else None, None, dbias, da if mask[1] else None,
                db if mask[2] else None, ds if mask[3] else None)


def alternative(name: str):
    """lora_linear through a kept alternative forward (bench/op_gpu.py): "pertile" (one
    program per output tile, u recomputed per tile) or "split" (shrink + GEMM, two launches)."""
    from . import triton_forward_pertile, triton_split
    forward_fn = {"pertile": triton_forward_pertile.forward, "split": triton_split.forward}[name]

    def op(x, weight, bias, lora_a, lora_b, scale):
        return _AlternativeForward.apply(forward_fn, x, weight, bias, lora_a, lora_b, scale)
    return op
