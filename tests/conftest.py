"""Test session setup. Without a GPU the Triton kernels run in Triton's CPU interpreter, which
must be switched on before any kernel module is imported (triton.jit reads it at decoration).

The tests live in one folder per area (kernels/, patcher/, fed/, bench/); the helpers they
share (op_cases, tiny_models, fed_fixtures, static_probe) stay here, put on sys.path."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
