"""What every Triton launcher builds: a ``Launch`` (kernel, grid, named arguments, warps,
stages), the autotuner's M bucket, the facts that decide whether a launch may use tensor
descriptors (TMA), and the tiles a launch gets on its device. Kept apart from the kernels so
that every kernel file and the static report (kernels/triton_static.py) share one
definition."""
from __future__ import annotations

import dataclasses

import torch
import triton

from .triton_config import (
    FwdConfig,
    arch_of,
    fwd_default,
    interpreter_config,
    interpreting,
    sm_count,
)

__all__ = ["Launch", "device_facts", "m_bucket", "matrix_rows", "tma_allowed",
           "tma_rows_aligned"]


@dataclasses.dataclass
class Launch:
    """One kernel launch, every argument by name: what runs, and what the static report
    (kernels/triton_static.py) compiles for a target without a GPU."""

    kernel: object
    grid: tuple
    args: dict
    num_warps: int
    num_stages: int

    def run(self):
        self.kernel[self.grid](**self.args, num_warps=self.num_warps,
                               num_stages=self.num_stages)


def m_bucket(m: int) -> int:
    """Autotune key of M: its power-of-two bucket (prefill configs hardly change within one)."""
    return 1 << max(m - 1, 0).bit_length()


def tma_rows_aligned(element_size: int, *row_strides: int) -> bool:
    """A tensor descriptor's rows (strides in elements) must start 16-byte aligned."""
    return all((stride * element_size) % 16 == 0 for stride in row_strides)


def tma_allowed(device: torch.device, *tensors) -> bool:
    """Tensor descriptors need sm_90+, a 16-bit dtype (one 128-byte swizzle row per 64 K
    columns), unit inner strides and 16-byte aligned rows and bases."""
    if interpreting() or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1:
            return False
        if not tma_rows_aligned(t.element_size(), t.stride(0)) or t.data_ptr() % 16:
            return False
    return True


def set_tma_allocator() -> None:
    """In-kernel tensor descriptors need a small global scratch per launch (Triton asks the
    allocator of the calling context); only a missing allocator is replaced."""
    from triton.runtime import _allocation
    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(
            size, dtype=torch.int8, device="cuda"))


def matrix_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """t as an (M, K) matrix: row-strided input is read in place, anything else copied once."""
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def device_facts(device: torch.device, n: int, r: int, cfg: FwdConfig | None, is_aligned: bool,
                 dtype: torch.dtype, tma: bool, gemm: bool = False) -> tuple[FwdConfig, int]:
    """(tiles, SM count) of a forward-family launch (``gemm``: of the GEMM + expand kernel):
    the given tiles, the interpreter's fixed ones, or the device's default for this problem."""
    if device.type != "cuda" or interpreting():
        return cfg or interpreter_config(r), 4
    return (cfg or fwd_default(arch_of(device), n, r, is_aligned, dtype, tma, gemm),
            sm_count(device))

