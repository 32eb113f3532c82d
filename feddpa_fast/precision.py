"""The frozen base model's dtype: its names, the machine's default, and the dtype the adapters
keep their master weights in (docs/precision.md).

The base runs in fp32, bf16 or fp16. The adapters stay fp32 under a half-precision base (as
PEFT's ``autocast_adapter_dtype=True``): the optimizer updates fp32 masters, the op reads them
cast to the base dtype once per call (rank x features: 9 K values per SmolLM2 projection, not
worth a cache) and accumulates in fp32, and the cast's backward hands the fp32 masters their
gradient.
"""
from __future__ import annotations

import torch

__all__ = ["BASE_DTYPES", "base_dtype", "default_base_dtype", "master_dtype",
           "native_bf16_cpu"]

# What ``--dtype`` names.
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HALF = (torch.float16, torch.bfloat16)


def base_dtype(name: str) -> torch.dtype:
    """The torch dtype ``--dtype name`` stands for.

    Raises:
        ValueError: ``name`` is not one of ``BASE_DTYPES``.
    """
    if name not in BASE_DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {list(BASE_DTYPES)}")
    return BASE_DTYPES[name]


def master_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a patched layer creates its adapters in: fp32 under a half-precision base,
    the base's own dtype otherwise (fp32, fp64)."""
    return torch.float32 if weight_dtype in _HALF else weight_dtype


def native_bf16_cpu() -> str | None:
    """What makes this CPU do bf16 matmuls natively ("AMX" or "AVX-512 BF16"), or None.

    Without either, oneDNN emulates bf16 through fp32 and a bf16 GEMM is slower than fp32
    (docs/precision.md has the measured ratio).
    """
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    for label, attr in checks:
        probe = getattr(torch.cpu, attr, None)  # private torch helpers: absent means no
        if probe is not None and probe():
            return label
    return None


def default_base_dtype(device: str | torch.device = "cpu") -> tuple[str, str]:
    """The base dtype a run takes when ``--dtype`` is unset, and why.

    Args:
        device: where the base model runs.

    Returns:
        ``(name, reason)``: ("bf16", ...) on CUDA and on a CPU with native bf16, else
        ("fp32", ...).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16", "the default on CUDA"
    if device.type == "cpu":
        native = native_bf16_cpu()
        if native:
            return "bf16", f"this CPU does bf16 natively ({native})"
        return "fp32", "this CPU has no native bf16 (no AMX, no AVX-512 BF16)"
    return "fp32", f"the default on {device.type}"
