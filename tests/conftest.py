"""Test session setup. Without a GPU the Triton kernels run in Triton's CPU interpreter, which
must be switched on before any kernel module is imported (triton.jit reads it at decoration)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
