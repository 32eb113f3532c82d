"""feddpa_fast.kernels: the ``lora_linear`` op and its backends. All compute, no model logic.

    y = x @ weight.T + bias + ((xl @ lora_a.T) * scale) @ lora_b.T,   xl = lora_input or x

(``lora_input``, optional: the A branch's own input, e.g. dropout(x) for LoRA dropout.)

Backends, chosen by the device of x:
    cpu   -> "native"    C++ (kernels/cpu), BLAS calls plus fused epilogues, C++ autograd
    cuda  -> "triton"    single-pass fused kernels (kernels/triton_*.py); "reference" if
                         triton is not installed
    other -> "reference" kernels/reference.py formulas
Force one with ``FEDDPA_FAST_BACKEND=native|triton|reference`` or ``lora_linear(..., backend=)``;
"triton" on CPU tensors needs TRITON_INTERPRET=1 (set before this package is imported).
"""
# The repository root holds this package as the directory `kernels/`. When that root is on
# sys.path (e.g. `python -m pytest` run from it), `import kernels` finds this directory;
# transformers imports `kernels` to probe for the Hugging Face package of that name. Imported
# under any name but feddpa_fast.kernels, stay inert: no version, no op registrations.
if __name__ == "feddpa_fast.kernels":
    from .dispatch import (  # noqa: F401
        BACKENDS,
        backend_for,
        lora_linear,
        native_library_path,
        reference,
        triton_available,
    )

    __all__ = ["BACKENDS", "backend_for", "lora_linear", "native_library_path", "reference",
               "triton_available"]
