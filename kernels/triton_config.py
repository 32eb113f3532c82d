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


def operand_class(dtype: torch.dtype) -> str:
    """How the kernels' dots run on ``dtype``: "16bit" (fp16 / bf16 on the tensor cores),
    "tf32" (fp32 operands on the tensor cores, where torch allows tf32) or "fp32" (ieee fp32:
    FMA, no tensor cores). Read at plan time, as the launch's PRECISION is."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if input_precision(dtype) == "tf32" else "fp32"


# (block_m, block_n, block_k, num_warps, num_stages); block_r comes from R. Every table is
# clean (no spills, shared memory within the limit) in the static report (bench/gpu_static.py)
# at every config the dispatcher, the autotuner, the tests or the benchmarks launch.
# 16-bit operands. The sm_80 persistent kernel spills at 4 warps with 128-row tiles (pointer
# loads: 255 registers), so those run 8 warps; 128 x 128 x 64 spills under 3.6 there,
# 64 x 64 x 64 with 4 warps (with the former lora_input stream) under 3.9 once the row offsets
# are int64, and 64 x 128 x 64 with 4 warps on sm_100a under 3.6.
_FWD = {
    "hopper": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
               (64, 256, 64, 4, 3)],
    "ampere": [(128, 128, 32, 8, 4), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3)],
}
# Hopper without tensor descriptors (a base or row not 16-byte aligned, the split's GEMM):
# pointer loads hold more addresses in registers, and 128 x 256 x 64 w8 spills there (255
# registers), as does 128 x 128 x 64 w4 s4, and 64 x 256 x 64 w4 s3 in the GEMM kernel on
# sm_100a (144 B). These two stay clean.
_FWD_POINTER_HOPPER = [(128, 128, 64, 8, 4), (64, 256, 64, 8, 3)]
# tf32 (fp32 operands on the tensor cores, always pointer loads): half the K depth for the
# same bytes per stage. 64 x 256 x 32 spills on sm_100a even at 8 warps, 128 x 128 x 16 on
# sm_80 (8 B).
_FWD_TF32 = {
    "hopper": [(128, 128, 32, 8, 4)],
    "ampere": [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3)],
}
# The GEMM + expand kernel's dx on sm_100a spills at the forward's 128 x 128 x 32 w8 (16-40 B
# at s4, 8-24 B at s3); 16-deep K steps with the same 4 stages are clean on sm_90a and sm_100a.
_GEMM_TF32 = {"hopper": [(128, 128, 16, 8, 4)], "ampere": _FWD_TF32["ampere"]}
# Sizes or row strides that are not multiples of 16 elements lose Triton's divisibility hint:
# loads go element by element with a pointer and a mask each, and the big tiles spill (255
# registers + 64-560 B of stack at 64 x 64 x 64 on sm_80, 416 B at 128 x 128 on sm_90a).
# These small tiles compile clean there (HGMMA still on sm_90a). On Hopper they take 8 warps
# (with pointer loads 4 spill 255 registers + 88 B in 16-bit, 32-160 B in tf32) and 2 stages
# (3 leave 8 B: the 16-bit dx with TMA on sm_100a at w4, the pointer-load forward at w8), and
# the tf32 tile 32 columns (64 x 64 x 16 leaves 8 B in the sm_100a forward at R = 48).
_FWD_UNALIGNED = {("hopper", "16bit"): (64, 64, 32, 8, 2), ("ampere", "16bit"): (32, 64, 32, 4, 3),
                  ("hopper", "tf32"): (64, 32, 16, 8, 2), ("ampere", "tf32"): (32, 64, 16, 8, 3)}
# ieee fp32 runs its dots on FMA units with the operand tiles in registers: from 64 x 64 x 16
# up every tile spills on sm_90a at R = 48 (255 registers + 200-1500 B), and two pipeline
# stages put 8-16 B in local memory even at 128 registers. This single-stage tile is clean on
# sm_80, sm_90a and sm_100a at R = 8, 32 and 48, aligned or not (Triton 3.6 and 3.9).
_FWD_FMA = (32, 32, 16, 8, 1)
# ... with 4 warps up to R padded to 32: at 8 the forward kept an 8 B frame on sm_90a at R = 8
# under Triton 3.6 (the GPU image's); 4 warps spill at R = 48 (216-264 B), so 8 stay there.
_FWD_FMA_NARROW = (32, 32, 16, 4, 1)
# The GEMM + expand kernel (dx, the split's GEMM; kernels/triton_gemm.py) takes 32-deep K
# steps: with 16 its dx kept a 24 B local frame at 40 registers under Triton 3.6 on sm_90a
# (M = 3 and 66 of the GPU tests); 32 x 32 x 32 is clean on sm_80, sm_90a and sm_100a under
# 3.6 and 3.9 (probed 2026-12-07).
_GEMM_FMA = (32, 32, 32, 8, 1)
# (block_n, block_k, num_warps, num_stages) per family and block_m (16 / 32 vs 64 rows); 64
# rows hold 4x the accumulator: 128 x 128 spills there on sm_90a, 256-deep K overflows shared
# memory, and sm_80 spills at 128 x 64 with 4 warps (the static report). 4-byte operands halve
# block_k (decode_candidates): 64 x 64 x 128 s4 in fp32 needs 245,760 B of shared memory,
# over sm_90a's 232,448.
_DECODE = {
    ("hopper", "small"): [(64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3)],
    ("hopper", "wide"): [(64, 128, 4, 4), (128, 64, 8, 3), (64, 64, 4, 4)],
    ("ampere", "small"): [(64, 128, 4, 4), (128, 64, 4, 3)],
    ("ampere", "wide"): [(64, 64, 4, 4), (128, 64, 8, 3)],
}
# (64 x 128-deep K at 64 rows overflowed sm_80's 166,912 B with the former lora_input's third
# stream; the gate keeps the table as it was measured.)


def decode_block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def aligned(*sizes: int) -> bool:
    """Whether every size / row stride is a multiple of 16 elements (Triton's hint)."""
    return all(v % 16 == 0 for v in sizes)


def fwd_candidates(arch: str, r: int, dtype: torch.dtype, tma: bool,
                   gemm: bool = False) -> list[FwdConfig]:
    """The prefill forward / dx / GEMM configs the autotuner may pick on ``arch`` for operands
    of ``dtype``, loaded through tensor descriptors (``tma``) or pointers; the small
    unaligned-shape config last, so that one clean config survives any prune. ``gemm``: for
    the GEMM + expand kernel (dx, the split's GEMM), whose ieee fp32 tile differs."""
    family, cls = _family(arch), operand_class(dtype)
    if cls == "fp32":
        narrow = padded_rank(r) <= 32
        tiles = [_GEMM_FMA if gemm else (_FWD_FMA_NARROW if narrow else _FWD_FMA)]
    elif cls == "tf32":
        tiles = (_GEMM_TF32 if gemm else _FWD_TF32)[family] + [_FWD_UNALIGNED[(family, cls)]]
    else:
        big = _FWD[family] if family == "ampere" or tma else _FWD_POINTER_HOPPER
        tiles = big + [_FWD_UNALIGNED[(family, cls)]]
    return [FwdConfig(bm, bn, bk, padded_rank(r), w, s) for bm, bn, bk, w, s in tiles]


def decode_candidates(arch: str, m: int, r: int, dtype: torch.dtype) -> list[FwdConfig]:
    """The split-K decode configs the autotuner may pick on ``arch`` for M rows. 4-byte
    operands: half the K depth (the same shared memory per stage), and 8 warps at 64 rows
    (64 x 64 x 64 w4 spills 680 B in fp32 on sm_100a)."""
    block_m = decode_block_m(m)
    rows = "wide" if block_m == 64 else "small"
    wide4 = dtype.itemsize == 4 and rows == "wide"
    k_div = 2 if dtype.itemsize == 4 else 1
    return [FwdConfig(block_m, bn, bk // k_div, padded_rank(r), 8 if wide4 else w, s)
            for bn, bk, w, s in _DECODE[(_family(arch), rows)]]


def fwd_default(arch: str, n: int, r: int, is_aligned: bool, dtype: torch.dtype,
                tma: bool, gemm: bool = False) -> FwdConfig:
    """The prefill config used without autotuning: the first candidate, with 128-wide
    columns when N is small; for unaligned shapes the small tile (the last candidate). On
    Ampere, R padded to 64 takes the small tile too (128 x 128 x 32 w8 spills 40-56 B on sm_80
    at R = 48)."""
    candidates = fwd_candidates(arch, r, dtype, tma, gemm)
    if not is_aligned or (_family(arch) == "ampere" and padded_rank(r) >= 64):
        return candidates[-1]
    first = candidates[0]
    if n < 2048 and first.block_n > 128:
        return dataclasses.replace(first, block_n=128)
    return first


def gemm_default(arch: str, n: int, r: int, is_aligned: bool, dtype: torch.dtype) -> FwdConfig:
    """The split forward's GEMM (us given: the in-op dropout forward), which loads through
    pointers: fwd_default of the GEMM kernel without TMA."""
    return fwd_default(arch, n, r, is_aligned, dtype, tma=False, gemm=True)


def decode_default(arch: str, m: int, r: int, is_aligned: bool, dtype: torch.dtype) -> FwdConfig:
    """The decode config without autotuning. Unaligned shapes take 64-deep K steps in 16-bit
    (128 spills at R = 48 on both archs); 4-byte operands 16-deep with 8 warps (32-deep at 4
    warps spills 24 B at R = 48 on sm_90a, 16-deep at 4 warps 16 B with the former
    lora_input stream)."""
    first = decode_candidates(arch, m, r, dtype)[0]
    if is_aligned:
        return first
    if dtype.itemsize == 4:
        return dataclasses.replace(first, block_k=16, num_warps=8)
    return dataclasses.replace(first, block_k=64)


def _backward_tiles(r: int, is_aligned: bool, dtype: torch.dtype) -> BwdConfig:
    """64 x 128 steps; 32 x 64 where that spills: unaligned sizes (64 x 128 spills there),
    ieee fp32 (FMA dots: 8.7 KB of stack in the dy pass on sm_90a) and R padded to 64 or more
    (the dy pass in tf32, dA under the dropout mask in 16-bit). ieee fp32 also takes 8 warps
    and one stage: at 4 warps and 2 stages the sm_80 dy pass spills 264 B at R = 48, dA 40 B."""
    if operand_class(dtype) == "fp32":
        return BwdConfig(32, 64, padded_rank(r), num_warps=8, num_stages=1)
    if not is_aligned or padded_rank(r) >= 64:
        return BwdConfig(32, 64, padded_rank(r), num_warps=4, num_stages=2)
    return BwdConfig(64, 128, padded_rank(r), num_warps=4, num_stages=2)


def dy_default(arch: str, r: int, is_aligned: bool, dtype: torch.dtype) -> BwdConfig:
    """The dy pass (g, dB): block_m rows x block_cols columns of N per step (not autotuned)."""
    return _backward_tiles(r, is_aligned, dtype)


def da_default(arch: str, r: int, is_aligned: bool, dtype: torch.dtype) -> BwdConfig:
    """The dA kernel: block_m rows of the reduction x block_cols columns of K (not autotuned).
    ``is_aligned`` covers M too, the reduction here (64 x 128 leaves 8 B in local memory on
    sm_80 at M = 10)."""
    return _backward_tiles(r, is_aligned, dtype)


def interpreter_config(r: int) -> FwdConfig:
    """The fixed small config of the interpreter (no autotuning without a GPU)."""
    return FwdConfig(32, 32, 32, padded_rank(r), num_warps=4, num_stages=1)


def interpreter_bwd_config(r: int) -> BwdConfig:
    return BwdConfig(32, 32, padded_rank(r), num_warps=4, num_stages=1)
