"""Loads the native CPU library (built by CMake from kernels/cpu/*.cpp by setup.py).

Loading it defines the ``torch.ops.feddpa`` operators (schemas, autograd, CPU kernels), so
nothing in feddpa_fast works without it: a missing library is an ImportError that says how to
build it, not a silent fallback.
"""
from __future__ import annotations

from pathlib import Path

import torch

_LIBRARY_GLOB = "_feddpa_cpu*.so"


def native_library_path() -> Path:
    """Path of the built native library next to this package, or ImportError if absent."""
    here = Path(__file__).resolve().parent
    found = sorted(here.glob(_LIBRARY_GLOB))
    if not found:
        raise ImportError(
            f"feddpa_fast's native library ({_LIBRARY_GLOB}) is not built in {here}. "
            "Build it with `pip install --no-build-isolation -e .` (torch must be installed "
            "first) or `make install`."
        )
    return found[0]


def load_native_library() -> Path:
    """Loads the library once per process; returns its path."""
    path = native_library_path()
    if not hasattr(torch.ops.feddpa, "lora_linear_fwd"):
        torch.ops.load_library(str(path))
    return path
