"""Loads the native CPU library (built by CMake from kernels/cpu/*.cpp by setup.py).

Loading it defines the ``torch.ops.feddpa`` operators (schemas, autograd, CPU kernels), so
nothing in feddpa_fast works without it: a missing library is an ImportError that says how to
build it, not a silent fallback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

_LIBRARY_GLOB = "_feddpa_cpu*.so"


def native_library_path() -> Path:
    """Path of the built native library in this package, or ImportError if absent.

    The package spans two directories in a source checkout (feddpa_fast/kernels/, where the
    build puts the library, and the repo's kernels/ sources), one in a wheel: all are searched.
    """
    package_dirs = [Path(d).resolve() for d in sys.modules[__package__].__path__]
    found = sorted(p for d in package_dirs for p in d.glob(_LIBRARY_GLOB))
    if not found:
        where = ", ".join(str(d) for d in package_dirs)
        raise ImportError(
            f"feddpa_fast's native library ({_LIBRARY_GLOB}) is not built in {where}. "
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
