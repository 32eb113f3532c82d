"""Dispatch of the lora_linear op to its backends (see the package docstring)."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from . import reference, reference_banked
from ._native import load_native_library, native_library_path

load_native_library()
from . import _register  # noqa: E402,F401  (fake kernels + other-device kernels)

__all__ = ["BACKENDS", "backend_for", "lora_linear", "lora_linear_banked", "native_library_path",
           "reference", "triton_available"]

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
    if device_type == "cuda" and triton_available():
        return "triton"
    if device_type == "cpu":
        return "triton" if _triton_serves(device_type) else "native"
    return "reference"


def _triton_serves(device_type: str) -> bool:
    """True when the Triton kernels serve ``device_type`` (never imports triton to say no)."""
    module = sys.modules.get(f"{__package__}.triton_op")
    return module is not None and module.serves(device_type)


def _forced_backend(backend: str | None) -> str | None:
    choice = backend if backend is not None else os.environ.get(_ENV_VAR) or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(
            f"unknown backend {choice!r} (from {'backend=' if backend else _ENV_VAR}); "
            f"choose one of {BACKENDS}"
        )
    return choice


def _seed_tensor(seed, device: torch.device):
    """An int seed as the op's one-element int64 tensor on ``device`` (tensors pass as given)."""
    if seed is None or isinstance(seed, torch.Tensor):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"lora_linear: dropout_seed must be an int or an int64 tensor, "
                        f"got {type(seed).__name__}")
    return torch.tensor(seed, dtype=torch.int64, device=device)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, *, dropout_p: float = 0.0,
                dropout_seed=None, backend: str | None = None):
    """Fused ``y = x W^T + b + ((xl A^T) * scale) B^T``; see kernels/reference.py for the contract.

    Args:
        x: (..., K) input; float32, float16, bfloat16 or float64.
        weight: (N, K) frozen weight (requires_grad must be False), dtype of x.
        bias: (N,) or None.
        lora_a: (R, K) the A matrices of all branches stacked by rows.
        lora_b: (N, R) the B matrices stacked the same way (columns).
        scale: (M, R) or (1, R) per-row branch factors, float32 (float64 for float64 x).
        dropout_p: in-op LoRA dropout: the A branch reads ``xl = x * keep / (1 - p)``, the keep
            mask generated in the kernel from ``dropout_seed`` and regenerated in backward
            (nothing of size (M, K) beyond x is saved). Without it xl = x.
        dropout_seed: int, or int64 one-element tensor on x's device; needed when dropout_p > 0.
            The same (seed, shape) gives the same mask on CPU and on GPU.
        backend: "native", "triton" or "reference" (or FEDDPA_FAST_BACKEND); by default the
            device of ``x`` picks it (``backend_for``). "triton" on CPU tensors needs
            TRITON_INTERPRET=1 and the Triton kernels serving the CPU (``triton_op.serving``,
            or FEDDPA_FAST_BACKEND=triton for the whole process).
    Returns:
        y, (..., N) in the dtype of x.
    Raises:
        ValueError / TypeError naming the argument for bad shapes, dtypes, devices or values.
    """
    dropout_seed = _seed_tensor(dropout_seed, x.device)
    args = (x, weight, bias, lora_a, lora_b, scale, float(dropout_p), dropout_seed)
    choice = _forced_backend(backend)
    if choice == "triton" and x.device.type == "cpu":
        _triton_serves_cpu(from_env=backend is None)
    if choice is None or choice == backend_for(x.device):
        return torch.ops.feddpa.lora_linear(*args)
    torch.ops.feddpa.lora_linear_check(*args)
    if choice == "reference":
        return reference.lora_linear(*args)
    raise ValueError(f"backend {choice!r} cannot run on {x.device} tensors here (this device "
                     f"runs {backend_for(x.device)!r})")


def _triton_serves_cpu(from_env: bool) -> None:
    """Forced Triton on CPU tensors: the interpreter must be on, and the Triton kernels must
    serve the CPU (the env variable makes them do so for the process)."""
    from .triton_config import interpreting
    if not interpreting():
        raise ValueError("backend 'triton' cannot run on cpu tensors: it needs a CUDA device, "
                         "or TRITON_INTERPRET=1 set before import")
    if from_env:
        _triton_op().serve_for_process("cpu")
    elif not _triton_op().serves("cpu"):
        raise ValueError("backend='triton' on cpu tensors runs inside "
                         "feddpa_fast.kernels.triton_op.serving('cpu') (or with "
                         f"{_ENV_VAR}=triton for the whole process)")


def lora_linear_banked(x, weight, bias, bank_a, bank_b, index, scale, *,
                       dropout_p: float = 0.0, dropout_seed=None, backend: str | None = None):
    """``lora_linear`` over rows that use different adapters of a bank (many clients in one
    call); see kernels/reference_banked.py for the contract.

    Args:
        x: (..., K) input; M = prod of the leading dims.
        weight, bias: the frozen (N, K) weight and (N,) bias or None, as in ``lora_linear``.
        bank_a: (S, r, K) the A matrices of S adapters (dtype of x).
        bank_b: (S, N, r) their B matrices.
        index: (M, B) int64: row m's branch b uses adapter ``index[m, b]`` (in [0, S)). FedDPA
            serving: B = 2, column 0 the shared global, column 1 each row's client.
        scale: (M, B * r) or (1, B * r) per-row factors, branch b in columns [b r, (b+1) r).
        dropout_p: in-op LoRA dropout; each client (a distinct index tuple) gets the mask it
            would get in a call of its own, from the seed of its last branch's adapter.
        dropout_seed: (S,) int64 tensor or a sequence of S ints, one seed per adapter; needed
            when dropout_p > 0.
        backend: "native", "triton" or "reference" (or FEDDPA_FAST_BACKEND); by default the
            device picks (``backend_for``: Triton on CUDA, kernels/triton_banked_passes.py).
            The frozen GEMM runs once over all rows; the rank-r work runs per client segment.
            "triton" on CPU tensors needs what it needs for ``lora_linear``.
    Returns:
        y, (..., N) in the dtype of x.
    Raises:
        ValueError / TypeError naming the argument for bad shapes, dtypes, devices, an index
        out of range or a row without an adapter.
    """
    if dropout_seed is not None and not isinstance(dropout_seed, torch.Tensor):
        dropout_seed = torch.tensor(list(dropout_seed), dtype=torch.int64, device=x.device)
    args = (x, weight, bias, bank_a, bank_b, index, scale, float(dropout_p), dropout_seed)
    choice = _forced_backend(backend)
    if choice == "triton" and x.device.type == "cpu":
        _triton_serves_cpu(from_env=backend is None)
    if choice is None or choice == backend_for(x.device):
        return torch.ops.feddpa.lora_linear_banked(*args)
    torch.ops.feddpa.lora_linear_banked_check(*args)
    torch.ops.feddpa.lora_linear_banked_check_index(index, bank_a.shape[0])
    if choice == "reference":
        return reference_banked.lora_linear_banked(*args)
    raise ValueError(f"backend {choice!r} cannot run on {x.device} tensors here (this device "
                     f"runs {backend_for(x.device)!r})")
