"""Glue between the Triton kernels and the op: the Triton kernels of the feddpa::lora_linear
family (``lora_linear``, ``lora_linear_fwd``, ``lora_linear_bwd``) and of the banked family
(``lora_linear_banked`` and its ``_fwd`` / ``_bwd``: kernels/triton_banked_passes.py). Autograd
is never here: it is each op's one C++ autograd kernel (kernels/cpu/ops.cpp, banked_ops.cpp),
which calls the ``_fwd`` / ``_bwd`` kernels of whatever serves the device.

- On CUDA the Triton kernels are registered once, for the process (``register_cuda_kernels``).
- ``serving(device_type, forward=...)`` registers them for a device for the length of a
  ``with`` block, in a scoped ``torch.library.Library`` that restores the previous kernels on
  exit: the interpreter tests run the Triton kernels on CPU tensors through the same autograd a
  GPU runs, and the benchmark times a measured alternative forward under the regular backward.

Import this module only with triton installed; feddpa_fast.kernels imports it lazily.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import torch

from . import (
    triton_backward,
    triton_banked_passes,
    triton_dropout,
    triton_forward,
    triton_split,
)

# Device types an open ``serving`` block (or FEDDPA_FAST_BACKEND=triton) gives to Triton.
_SERVED = Counter()
_FOR_PROCESS: list = []  # the libraries of serve_for_process, kept alive for the process


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _fwd(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, dropout_seed=None):
    torch.ops.feddpa.lora_linear_check(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                       dropout_seed)
    dropout = triton_dropout.from_op_args(dropout_p, dropout_seed)
    with _on_device(x):
        if dropout is not None:  # the shrink applies the mask (kernels/triton_split.py)
            return triton_split.forward(x, weight, bias, lora_a, lora_b, scale, dropout)
        return triton_forward.forward(x, weight, bias, lora_a, lora_b, scale)


def _bwd(dy, x, weight, lora_a, lora_b, scale, u, output_mask, dropout_p=0.0,
         dropout_seed=None):
    dropout = triton_dropout.from_op_args(dropout_p, dropout_seed)
    with _on_device(dy):
        return triton_backward.backward(dy, x, weight, lora_a, lora_b, scale, u,
                                        list(output_mask), dropout=dropout)


def _banked_fwd(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0,
                dropout_seed=None):
    torch.ops.feddpa.lora_linear_banked_check(x, weight, bias, bank_a, bank_b, index, scale,
                                              dropout_p, dropout_seed)
    torch.ops.feddpa.lora_linear_banked_check_index(index, bank_a.shape[0])
    with _on_device(x):
        return triton_banked_passes.forward(x, weight, bias, bank_a, bank_b, index, scale,
                                            dropout_p, dropout_seed)


def _banked_bwd(dy, x, weight, bank_a, bank_b, index, scale, u, output_mask, dropout_p=0.0,
                dropout_seed=None):
    with _on_device(dy):
        return triton_banked_passes.backward(dy, x, weight, bank_a, bank_b, index, scale, u,
                                             list(output_mask), dropout_p, dropout_seed)


_BANKED = {"lora_linear_banked_fwd": _banked_fwd, "lora_linear_banked_bwd": _banked_bwd,
           "lora_linear_banked": lambda *a, **kw: _banked_fwd(*a, **kw)[0]}


def _kernels(forward=None) -> dict:
    """The op family's kernels: Triton's, or ``forward`` (returning (y, u), no dropout) in place
    of the Triton forward under the regular Triton backward."""
    if forward is None:
        fwd = _fwd
    else:
        def fwd(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, dropout_seed=None):
            if dropout_p > 0:
                raise ValueError("lora_linear: the measured alternative forwards take no "
                                 "in-op dropout")
            torch.ops.feddpa.lora_linear_check(x, weight, bias, lora_a, lora_b, scale)
            with _on_device(x):
                return forward(x, weight, bias, lora_a, lora_b, scale)
    return {"lora_linear_fwd": fwd, "lora_linear_bwd": _bwd,
            "lora_linear": lambda *a, **kw: fwd(*a, **kw)[0], **_BANKED}


def register_cuda_kernels() -> None:
    """Makes Triton the CUDA implementation of both op families (idempotent)."""
    if getattr(register_cuda_kernels, "_done", False):
        return
    for name, fn in _kernels().items():
        torch.library.impl(f"feddpa::{name}", "CUDA")(fn)
    register_cuda_kernels._done = True


def serves(device_type: str) -> bool:
    """True while the Triton kernels serve ``device_type`` through ``serving`` (or for good)."""
    return _SERVED[device_type] > 0


def _register(device_type: str, forward=None) -> torch.library.Library:
    library = torch.library.Library("feddpa", "IMPL")
    with warnings.catch_warnings():  # replacing the device's kernels is the point
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")
        for name, fn in _kernels(forward).items():
            library.impl(name, fn, device_type.upper())
    _SERVED[device_type] += 1
    return library


@contextlib.contextmanager
def serving(device_type: str, forward=None):
    """The Triton kernels serve ``device_type``'s tensors inside the block (the op's autograd,
    checks and dispatch unchanged); the previous kernels come back on exit.

    Args:
        device_type: "cpu" (needs TRITON_INTERPRET=1 before import) or "cuda".
        forward: optional measured alternative forward, ``f(x, weight, bias, lora_a, lora_b,
            scale) -> (y, u)`` (``alternative_forward``), used in place of the Triton forward.
    """
    library = _register(device_type, forward)
    try:
        yield
    finally:
        _SERVED[device_type] -= 1
        library._destroy()


def serve_for_process(device_type: str) -> None:
    """The Triton kernels serve ``device_type`` from now on (FEDDPA_FAST_BACKEND=triton)."""
    if not serves(device_type):
        _FOR_PROCESS.append(_register(device_type))


def alternative_forward(name: str):
    """A kept alternative forward for ``serving(..., forward=)`` (bench/op_gpu.py): "pertile"
    (one program per output tile, u recomputed per tile) or "split" (shrink + GEMM, two
    launches)."""
    from . import triton_forward_pertile
    return {"pertile": triton_forward_pertile.forward,
            "split": triton_split.forward}[name]
