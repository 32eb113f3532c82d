"""feddpa_fast.kernels: the ``lora_linear`` op and its backends. All compute, no model logic.

    y = x @ weight.T + bias + ((xl @ lora_a.T) * scale) @ lora_b.T

xl = x, or x * keep / (1 - p) under the in-op LoRA dropout (``dropout_p``, ``dropout_seed``).

Backends, chosen by the device of x:
    cpu   -> "native"    C++ (kernels/cpu), BLAS calls plus fused epilogues, C++ autograd
    cuda  -> "triton"    single-pass fused kernels (kernels/triton_*.py); "reference" if
                         triton is not installed
    other -> "reference" kernels/reference.py formulas
Force one with ``FEDDPA_FAST_BACKEND=native|triton|reference`` or ``lora_linear(..., backend=)``;
"triton" on CPU tensors needs TRITON_INTERPRET=1 (set before this package is imported) and
runs through the op's one autograd kernel, as on a GPU (``triton_op.serving("cpu")``).
"""
# The kernel sources live in the repository's top-level kernels/ directory, which has no
# __init__.py: the import name `kernels` belongs to Hugging Face's package, which transformers
# >= 5.25 imports, and a regular package at the repo root would shadow it whenever the root is
# on sys.path (docs/ARCHITECTURE.md, "The import name kernels"). In a source checkout or an
# editable install this package therefore reaches those sources through __path__; a wheel
# copies them in beside this file (setup.py, BuildPy), and then nothing is added.
from pathlib import Path as _Path

if not (_Path(__file__).with_name("dispatch.py")).exists():
    __path__.append(str(_Path(__file__).resolve().parents[2] / "kernels"))  # noqa: F821

from .dispatch import (  # noqa: E402
    BACKENDS,
    backend_for,
    lora_linear,
    lora_linear_banked,
    native_library_path,
    reference,
    triton_available,
)

__all__ = ["BACKENDS", "backend_for", "lora_linear", "lora_linear_banked", "native_library_path",
           "reference", "triton_available"]
