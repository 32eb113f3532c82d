"""Dispatch of the lora_linear op to its backends (see the package docstring)."""

from __future__ import annotations

import importlib.util
import os

import torch

from . import reference
from ._native import load_native_library, native_library_path

load_native_library()
from . import _register  # noqa: E402,F401  (fake kernels + other-device kernels)

__all__ = ["BACKENDS", "backend_for", "lora_linear", "native_library_path", "reference",
           "triton_available"]

BACKENDS = ("native", "triton", "reference")
_ENV_VAR = "FEDDPA_FAST_BACKEND"


def triton_available() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _triton_op():
    """The Triton glue module, imported on first use (importing triton costs ~1 s)."""
    if not triton_available():
        raise ValueError("backend 'triton' needs the triton package (pip install triton)")
    from . import triton_op
    return triton_op


if torch.cuda.is_available() and triton_available():
    _triton_op().register_cuda_kernels()


def backend_for(device: torch.device | str) -> str:
    """Name of the backend the op uses for tensors on ``device`` when nothing is forced."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return "native"
    if device_type == "cuda" and triton_available():
        return "triton"
    return "reference"


def _forced_backend(backend: str | None) -> str | None:
    choice = backend if backend is not None else os.environ.get(_ENV_VAR) or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(
            f"unknown backend {choice!r} (from {'backend=' if backend else _ENV_VAR}); "
            f"choose one of {BACKENDS}"
        )
    return choice


def lora_linear(x, weight, bias, lora_a, lora_b, scale, lora_input=None, *,
                backend: str | None = None):
    """Fused ``y = x W^T + b + ((xl A^T) * scale) B^T``; see kernels/reference.py for the contract.

    ``lora_input`` (xl; default x) is the input of the LoRA A branch when it differs from x,
    e.g. ``dropout(x)`` for LoRA dropout as PEFT applies it (the frozen GEMM still reads x). It
    must match x in shape, dtype and device, and receives its own gradient ``gs A`` while x gets
    ``dy W``. ``backend`` (or the environment variable FEDDPA_FAST_BACKEND) forces a backend;
    by default the device of ``x`` picks it (``backend_for``). Bad shapes, dtypes or devices
    raise ValueError / TypeError naming the argument.
    """
    args = (x, weight, bias, lora_a, lora_b, scale, lora_input)
    choice = _forced_backend(backend)
    if choice is None or choice == backend_for(x.device):
        return torch.ops.feddpa.lora_linear(*args)
    torch.ops.feddpa.lora_linear_check(*args)
    if choice == "reference":
        return reference.lora_linear(*args)
    if choice == "triton":
        from .triton_config import interpreting
        if x.device.type != "cuda" and not interpreting():
            raise ValueError(f"backend 'triton' cannot run on {x.device} tensors: it needs a "
                             "CUDA device, or TRITON_INTERPRET=1 set before import")
        return _triton_op().lora_linear(*args)
    # choice == "native" on a device that is not the CPU.
    raise ValueError(f"backend 'native' runs on CPU tensors only; x is on {x.device}")
