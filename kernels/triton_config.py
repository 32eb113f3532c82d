"""Tile configurations of the Triton kernels, and the facts about the run (interpreter or GPU,
tf32 allowed or not, the device's architecture) that the launchers need.

Configs are declared here once, per architecture family:
- ``fwd_candidates(arch)`` / ``decode_candidates(arch, m)``: what the CUDA autotuner
  (kernels/triton_autotune.py) may choose from. The full static report (bench/gpu_static.py,
  make gpu-static) compiles every one of them for sm_80, sm_90a and sm_100a; the CI gate
  compiles the forward's candidates and the dispatched configs of every kernel; at run time
  the autotuner's prune drops any that the same static compile flags on the current GPU.
- ``fwd_default(...)`` etc.: the one config per problem used when autotuning is off
  (FEDDPA_FAST_AUTOTUNE=0), by the static report's "dispatched" rows, and (small tiles) by the
  interpreter, where autotuning and timing cannot run.
None of these were tuned on hardware: no GPU has been lent to this project yet (docs/gpu.md,
Limits).
"""
from __future__ import annotations

import dataclasses
import os

import torch


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Tiles of the forward / dx / decode kernels. block_r is R padded to a power of two
    >= 16 (the smallest GPU dot dimension)."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} r{self.block_r} "
                f"w{self.num_warps} s{self.num_stages}")


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Tiles of a backward kernel: block_m rows of M by block_cols of the kernel's wide
    dimension (N for the dy pass, K for the dA kernel)."""

    block_m: int
    block_cols: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 2

    def label(self) -> str:
        return (f"{self.block_m}x{self.block_cols} r{self.block_r} w{self.num_warps} "
                f"s{self.num_stages}")


# Decode-sized M (<= this) takes the split-K kernel (kernels/triton_decode.py).
DECODE_MAX_M = 64


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def autotune_enabled() -> bool:
    """CUDA launches autotune unless FEDDPA_FAST_AUTOTUNE=0 (then fwd_default & co. are used)."""
    return os.environ.get("FEDDPA_FAST_AUTOTUNE", "1") not in ("0", "false", "False")


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: tf32 for fp32 only where the caller's matmul precision allows
    it (torch.backends.cuda.matmul.allow_tf32); 16-bit dtypes ignore it."""
    if interpreting():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def padded_rank(r: int) -> int:
    """R rounded up to a power of two, at least 16: the smallest dot dimension on GPU."""
    return max(16, 1 << max(r - 1, 0).bit_length())


def arch_of(device: torch.device) -> str:
    """The static report's name of a CUDA device's architecture: sm_80, sm_90a, sm_100a."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _family(arch: str) -> str:
    """sm_90a and newer share the Hopper tables; anything older the Ampere ones (whose
    register file does not hold a 128 x 256 fp32 accumulator plus u: 255 regs + spills)."""
    return "hopper" if int(arch[3:].rstrip("a")) >= 90 else "ampere"


# (block_m, block_n, block_k, num_warps, num_stages); block_r comes from R.
# Each list is clean (no spills, shared memory within the limit) in the static report at the
# benchmark's aligned shapes, under Triton 3.9 and 3.6. The sm_80 persistent kernel spills at
# 4 warps with 128-row tiles (pointer loads: 255 registers), so those run 8 warps; 128 x 128 x
# 64 spills under 3.6 there, 64 x 64 x 64 with 4 warps (and lora_input) under 3.9 once the
# row offsets are int64, and 64 x 128 x 64 with 4 warps on sm_100a under 3.6.
_FWD = {
    "hopper": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
               (64, 256, 64, 4, 3)],
    "ampere": [(128, 128, 32, 8, 4), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3)],
}
# Sizes or row strides that are not multiples of 16 elements lose Triton's divisibility hint:
# loads go element by element with a pointer and a mask each, and the big tiles spill (255
# registers + 64-560 B of stack at 64 x 64 x 64 on sm_80, 416 B at 128 x 128 on sm_90a).
# These small tiles compile clean there (HGMMA still on sm_90a).
_FWD_UNALIGNED = {"hopper": (64, 64, 32, 4, 3), "ampere": (32, 64, 32, 4, 3)}
# (block_n, block_k, num_warps, num_stages) per family and block_m (16 / 32 vs 64 rows); 64
# rows hold 4x the accumulator: 128 x 128 spills there on sm_90a, 256-deep K overflows shared
# memory, and sm_80 spills at 128 x 64 with 4 warps (the static report).
_DECODE = {
    ("hopper", "small"): [(64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3)],
    ("hopper", "wide"): [(64, 128, 4, 4), (128, 64, 8, 3), (64, 64, 4, 4)],
    ("ampere", "small"): [(64, 128, 4, 4), (128, 64, 4, 3)],
    ("ampere", "wide"): [(64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3)],
}


def decode_block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def aligned(*sizes: int) -> bool:
    """Whether every size / row stride is a multiple of 16 elements (Triton's hint)."""
    return all(v % 16 == 0 for v in sizes)


def fwd_candidates(arch: str, r: int) -> list[FwdConfig]:
    """The prefill forward / dx configs the autotuner may pick on ``arch`` (the small
    unaligned-shape config last, so that one clean config survives any prune)."""
    family = _family(arch)
    return [FwdConfig(bm, bn, bk, padded_rank(r), w, s)
            for bm, bn, bk, w, s in _FWD[family] + [_FWD_UNALIGNED[family]]]


def decode_candidates(arch: str, m: int, r: int) -> list[FwdConfig]:
    """The split-K decode configs the autotuner may pick on ``arch`` for M rows."""
    block_m = decode_block_m(m)
    rows = "wide" if block_m == 64 else "small"
    return [FwdConfig(block_m, bn, bk, padded_rank(r), w, s)
            for bn, bk, w, s in _DECODE[(_family(arch), rows)]]


def fwd_default(arch: str, n: int, r: int, is_aligned: bool = True) -> FwdConfig:
    """The prefill config used without autotuning: the first candidate, with 128-wide
    columns when N is small; the small tiles for unaligned shapes."""
    if not is_aligned:
        return fwd_candidates(arch, r)[-1]
    first = fwd_candidates(arch, r)[0]
    if n < 2048 and first.block_n > 128:
        return dataclasses.replace(first, block_n=128)
    return first


def gemm_default(arch: str, n: int, r: int, is_aligned: bool = True) -> FwdConfig:
    """The split forward's GEMM (us given: the in-op dropout forward): fwd_default, with 8 warps
    for unaligned shapes (at 64x64x32 w4 it spills on sm_90a, 255 registers + 24-32 B at
    R = 8 and 48; w8 needs 130)."""
    cfg = fwd_default(arch, n, r, is_aligned)
    return cfg if is_aligned else dataclasses.replace(cfg, num_warps=8)


def decode_default(arch: str, m: int, r: int, is_aligned: bool = True) -> FwdConfig:
    """The decode config without autotuning; 64-deep K steps for unaligned shapes (128 spill
    at R = 48 on both archs)."""
    first = decode_candidates(arch, m, r)[0]
    return first if is_aligned else dataclasses.replace(first, block_k=64)


def dy_default(arch: str, r: int, is_aligned: bool = True) -> BwdConfig:
    """The dy pass (g, dB): 64 rows x 128 columns per step (not autotuned); 32 x 64 for
    unaligned N (64 x 128 spills there)."""
    if not is_aligned:
        return BwdConfig(32, 64, padded_rank(r), num_warps=4, num_stages=2)
    return BwdConfig(64, 128, padded_rank(r), num_warps=4, num_stages=2)


def da_default(arch: str, r: int, is_aligned: bool = True) -> BwdConfig:
    """The dA kernel: block_m rows of the reduction x block_cols columns of K (not
    autotuned); 32 x 64 for unaligned K (64 x 128 spills there on sm_100a)."""
    if not is_aligned:
        return BwdConfig(32, 64, padded_rank(r), num_warps=4, num_stages=2)
    return BwdConfig(64, 128, padded_rank(r), num_warps=4, num_stages=2)


def interpreter_config(r: int) -> FwdConfig:
    """The fixed small config of the interpreter (no autotuning without a GPU)."""
    return FwdConfig(32, 32, 32, padded_rank(r), num_warps=4, num_stages=1)


def interpreter_bwd_config(r: int) -> BwdConfig:
    return BwdConfig(32, 32, padded_rank(r), num_warps=4, num_stages=1)
