"""Every Triton launch one op problem makes, as Launch plans on the meta device, and their
compiles in a process pool. One enumeration serves two jobs:

- the static GPU report and its CI gate (bench/gpu_static.py) compile each launch for a target
  without a GPU and read the cubin;
- the GPU check (bench/gpu_check.py) compiles the launches of its benchmark steps on the GPU
  machine, 16 processes at once, before anything is timed: ``triton.compile`` with the launch's
  own specialisation and the device's target writes the cache entry the real launch then reads
  (docs/gpu.md, "Warming Triton's cache").

A problem is one lora_linear call (M, K, N, R, operand dtype); its launches follow the
dispatcher: M <= DECODE_MAX_M takes the one-launch decode, larger M the chunked forward; the
backward's dx runs the GEMM + expand kernel (the prefill config with K output columns), the dy
pass and dA; in-op dropout runs the split forward (masked shrink, then the GEMM) and a masked
expand of dx. With ``autotune`` the forward / GEMM / dx and decode kernels add every candidate
the CUDA autotuner may try; ``alternatives`` adds the benchmark's measured alternatives.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import time

import torch

from feddpa_fast.kernels import (
    triton_backward,
    triton_decode,
    triton_dropout,
    triton_forward,
    triton_forward_pertile,
    triton_gemm,
    triton_launch,
    triton_schedule,
    triton_split,
    triton_static,
)
from feddpa_fast.kernels.triton_config import (
    DECODE_MAX_M,
    aligned,
    da_default,
    decode_candidates,
    decode_default,
    dy_default,
    fwd_candidates,
    fwd_default,
    gemm_default,
)
from feddpa_fast.kernels.triton_dropout import InOpDropout

# The operand dtypes by the report's name: (torch dtype, tf32 allowed). fp32 runs at ieee
# precision by default (torch's allow_tf32 is off, and the GPU tests compare at ieee) and at
# tf32 when the caller allows it: two different binaries.
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
          "fp32": (torch.float32, False), "tf32": (torch.float32, True)}

# In-op LoRA dropout at the authors' p: the mask is generated in the kernels (Philox), so these
# variants carry its register cost.
DROPOUT = InOpDropout(0.05, torch.empty(1, device="meta", dtype=torch.int64))


# The shapes tests/kernels/test_kernels_triton_gpu.py runs against the float64 reference
# ((leading shape of x), K, N, R), and the single shapes of its other tests (M, K, N, R): the
# static gate compiles every launch they make, in every dtype.
GPU_TEST_SHAPES = [((1,), 48, 40, 8), ((3,), 80, 96, 16), ((67,), 48, 96, 48),
                   ((2, 5), 80, 40, 8), ((1,), 4096, 4096, 32), ((16,), 4096, 11008, 32),
                   ((64,), 4096, 4096, 32), ((513,), 1000, 1030, 32), ((2, 1024), 4096, 4096, 32)]
GPU_TEST_PROBLEMS = sorted({(math.prod(s), k, n, r) for s, k, n, r in GPU_TEST_SHAPES} | {
    (66, 256, 320, 16), (132, 256, 320, 16), (1000, 4096, 4096, 32), (512, 1024, 2048, 32)})


@dataclasses.dataclass(frozen=True)
class Problem:
    """One lora_linear call: x (M x K), W (N x K), rank R (both branches stacked)."""

    m: int
    k: int
    n: int
    r: int
    dtype: str = "bf16"
    kind: str = "prefill"   # the report's label: prefill / decode / odd / test
    autotune: bool = False  # also every candidate the CUDA autotuner may try
    alternatives: bool = False  # also the benchmark's measured alternatives
    branches: int = 0       # > 0: the banked op, B branches of rank r over ``clients``
    clients: int = 0        # segments (bench/gpu_launches_banked.py)

    @property
    def label(self) -> str:
        if self.branches:
            return (f"banked {self.kind} M={self.m} K={self.k} N={self.n} r={self.r} "
                    f"B={self.branches} clients={self.clients}")
        return f"{self.kind} M={self.m} K={self.k} N={self.n} R={self.r}"


@dataclasses.dataclass
class Case:
    kernel: str
    case: str          # the problem's label
    dtype: str
    prefill: bool      # gate: HGMMA required on sm_90a (16-bit and tf32 operands)
    config: str
    source: str        # dispatched / autotune / fixed / alternative
    launch: object
    extra_mma_frac: float
    atomics_per_elem: int


def meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


@contextlib.contextmanager
def tf32(allowed: bool):
    """The plans read torch's allow_tf32 for fp32's dot precision (kernels/triton_config.py)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def problem_cases(p: Problem, target: str) -> list[Case]:
    """Every launch of ``p`` (forward, backward, in-op dropout) on ``target``."""
    dtype, allow_tf32 = DTYPES[p.dtype]
    with tf32(allow_tf32):
        if p.branches:
            return _banked(p, dtype, target)
        return _cases(p, dtype, target, p.autotune, p.alternatives)


def _banked(p, dtype, target) -> list[Case]:
    """The banked op's launches (bench/gpu_launches_banked.py)."""
    from gpu_launches_banked import banked_cases
    wide = dtype in (torch.float16, torch.bfloat16) or DTYPES[p.dtype][1]
    cases = []

    def add(kernel, config, source, launch, prefill=True):
        cases.append(Case(kernel, p.label, p.dtype, prefill and wide, config, source, launch,
                          0.0, 0))

    banked_cases(p, dtype, target, triton_schedule.SMS[target], add,
                 lambda cfg, tma: _with_candidates(cfg, target, 16, dtype, p.autotune, tma,
                                                   gemm=True))
    return cases


def _cases(p, dtype, target, autotune, alternatives) -> list[Case]:
    m, k, n, r = p.m, p.k, p.n, p.r
    sms = triton_schedule.SMS[target]
    wide = dtype in (torch.float16, torch.bfloat16) or DTYPES[p.dtype][1]
    t = dict(x=meta(m, k, dtype=dtype), w=meta(n, k, dtype=dtype), bias=meta(n, dtype=dtype),
             a=meta(r, k, dtype=dtype), b=meta(n, r, dtype=dtype),
             scale=meta(m, r, dtype=torch.float32))
    u32, us = meta(m, r, dtype=torch.float32), meta(m, r, dtype=dtype)
    # As tma_allowed decides at a launch: sm_90+, 16-bit operands, 16-byte aligned rows.
    tma_ok = target != "sm_80" and dtype != torch.float32
    fwd_tma = tma_ok and triton_launch.tma_rows_aligned(dtype.itemsize, k)
    dx_tma = tma_ok and triton_launch.tma_rows_aligned(dtype.itemsize, k, n)
    fwd_cfg = fwd_default(target, n, r, aligned(k, n), dtype, fwd_tma)
    dx_cfg = fwd_default(target, k, r, aligned(k, n), dtype, dx_tma, gemm=True)
    pointer_cfg = fwd_default(target, n, r, aligned(k, n), dtype, tma=False)
    cases = []

    def add(kernel, config, source, launch, prefill=True, extra=0.0, atomics=0):
        cases.append(Case(kernel, p.label, p.dtype, prefill and wide, config, source, launch,
                          extra, atomics))

    # Forward: the one-launch decode, or the chunked forward.
    if m <= DECODE_MAX_M:
        dispatched = decode_default(target, m, r, aligned(k, n), dtype)
        configs = [(dispatched, "dispatched")] + ([
            (c, "autotune") for c in decode_candidates(target, m, r, dtype) if c != dispatched]
            if autotune else [])
        for cfg, source in configs:
            launch = triton_decode.plan(t["x"], t["w"], t["bias"], t["a"], t["b"], t["scale"],
                                        meta(m, n, dtype=dtype), u32, cfg=cfg, sms=sms)
            sched = triton_schedule.decode_schedule(m, n, k, cfg.block_m, cfg.block_n,
                                                    cfg.block_k, cfg.block_r, sms)
            add("decode", cfg.label(), source, launch, prefill=False,
                extra=sched.extra_mma_frac)
    else:
        for cfg, source in _with_candidates(fwd_cfg, target, r, dtype, autotune, fwd_tma):
            launch = triton_forward.forward_plan(
                t["x"], t["w"], t["bias"], t["a"], t["b"], t["scale"], meta(m, n, dtype=dtype),
                u32, use_tma=fwd_tma, cfg=cfg, sms=sms)
            sched = triton_schedule.forward_schedule(m, n, cfg.block_m, cfg.block_n,
                                                     cfg.block_r, sms, computes_u=True)
            add("fwd", cfg.label(), source, launch, extra=sched.extra_mma_frac)
        if fwd_tma:  # tensors whose base is not 16-byte aligned take pointer loads
            launch = triton_forward.forward_plan(
                t["x"], t["w"], t["bias"], t["a"], t["b"], t["scale"], meta(m, n, dtype=dtype),
                u32, use_tma=False, cfg=pointer_cfg, sms=sms)
            add("fwd_pointer_loads", pointer_cfg.label(), "dispatched", launch)
    # Backward: dx through the GEMM + expand kernel (K output columns), the dy pass, dA.
    for cfg, source in _with_candidates(dx_cfg, target, r, dtype, autotune, dx_tma, gemm=True):
        for kernel, gs in (("dx", meta(m, r, dtype=dtype)), ("dx_dy_only", None)):
            launch = triton_gemm.dx_plan(meta(m, n, dtype=dtype), t["w"], t["a"], gs,
                                            meta(m, k, dtype=dtype), use_tma=dx_tma, cfg=cfg,
                                            sms=sms)
            add(kernel, cfg.label(), source, launch)
    _backward_cases(p, dtype, target, sms, add)
    # In-op dropout: the masked shrink, the GEMM taking its (u * S), the masked expand of dx.
    gemm_cfg = gemm_default(target, n, r, aligned(k, n), dtype)
    shrink = triton_split.shrink_plan(t["x"], t["a"], t["scale"], u32, us, dropout=DROPOUT)
    add("dropout_shrink", f"{shrink.args['BLOCK_M']}x{shrink.args['BLOCK_K']} w4 s3",
        "dispatched", shrink, prefill=False)
    for cfg, source in _with_candidates(gemm_cfg, target, r, dtype, autotune, False, gemm=True):
        launch = triton_gemm.gemm_plan(t["x"], t["w"], t["bias"], t["b"], us,
                                          meta(m, n, dtype=dtype), cfg=cfg, sms=sms)
        add("gemm", cfg.label(), source, launch)
    expand = triton_dropout.masked_expand_plan(meta(m, k, dtype=dtype), us, t["a"], DROPOUT)
    add("dropout_expand", "64x64 w8 s2", "dispatched", expand, prefill=False)
    if alternatives and m > DECODE_MAX_M:
        _alternative_cases(p, t, u32, us, dtype, pointer_cfg, add)
    return cases


def _with_candidates(dispatched, target, r, dtype, autotune, tma, gemm=False):
    """The dispatched config, and with ``autotune`` every other candidate of the forward (or
    of the GEMM kernel: ``gemm``)."""
    return [(dispatched, "dispatched")] + ([
        (c, "autotune") for c in fwd_candidates(target, r, dtype, tma, gemm) if c != dispatched]
        if autotune else [])


def _backward_cases(p, dtype, target, sms, add) -> None:
    """The dy pass (g, dB) and dA (plain and masking x) at their fixed configs."""
    m, k, n, r = p.m, p.k, p.n, p.r
    dy_cfg = dy_default(target, r, aligned(n), dtype)
    da_cfg = da_default(target, r, aligned(k, m), dtype)
    dy = triton_backward.dy_plan(meta(m, n, dtype=dtype), meta(n, r, dtype=dtype),
                                 meta(m, r, dtype=dtype), meta(m, r, dtype=torch.float32),
                                 meta(n, r, dtype=torch.float32), need_db=True, cfg=dy_cfg,
                                 sms=sms)
    dy_sched = triton_schedule.dy_schedule(m, n, dy_cfg.block_m, dy_cfg.block_cols, sms)
    # dB: one atomic add per row block; g: one per slice of N (when sliced).
    add("dy_pass", dy_cfg.label(), "fixed", dy, prefill=m > DECODE_MAX_M,
        atomics=max(dy_sched.row_blocks, dy_sched.chunks if dy_sched.chunks > 1 else 0))
    da_sched = triton_schedule.da_schedule(m, k, da_cfg.block_m, da_cfg.block_cols, sms)
    for kernel, dropout in (("dA", None), ("dA_dropout", DROPOUT)):
        launch = triton_backward.da_plan(meta(m, r, dtype=dtype), meta(m, k, dtype=dtype),
                                         meta(r, k, dtype=torch.float32), cfg=da_cfg, sms=sms,
                                         dropout=dropout)
        add(kernel, da_cfg.label(), "fixed", launch, prefill=m > DECODE_MAX_M,
            atomics=da_sched.chunks)


def _alternative_cases(p, t, u32, us, dtype, cfg, add) -> None:
    """The measured alternatives of bench/op_gpu.py: the per-tile forward and the split's
    shrink (its GEMM is the dropout path's ``gemm``)."""
    m, n = p.m, p.n
    pertile = triton_forward_pertile.plan(t["x"], t["w"], t["bias"], t["a"], t["b"], t["scale"],
                                          meta(m, n, dtype=dtype), u32, cfg)
    add("fwd_pertile", cfg.label(), "alternative", pertile,
        extra=triton_schedule.pertile_schedule(m, n, cfg.block_m, cfg.block_n,
                                               cfg.block_r).extra_mma_frac)
    shrink = triton_split.shrink_plan(t["x"], t["a"], t["scale"], u32, us)
    add("split_shrink", f"{shrink.args['BLOCK_M']}x{shrink.args['BLOCK_K']} w4 s3",
        "alternative", shrink)


def build_cases(problems, target: str) -> list[Case]:
    """The cases of every problem, in order (the same order in every process)."""
    return [c for p in problems for c in problem_cases(p, target)]


def unique_keys(cases: list[Case], target: str) -> dict:
    """compile key -> index of its first case: the binaries these cases need."""
    keys = {}
    for i, c in enumerate(cases):
        keys.setdefault(triton_static.compile_key(c.launch, target), i)
    return keys


_WORKER: dict = {}


def _init_worker(problems, target, read):
    _WORKER.update(cases=build_cases(problems, target), target=target, read=read)


def _compile_one(index: int):
    """(index, report or None, seconds, error) of one case's compile in this worker."""
    case, target = _WORKER["cases"][index], _WORKER["target"]
    start = time.perf_counter()
    try:
        if _WORKER["read"]:
            report = triton_static.compile_report(case.launch, target)
        else:
            triton_static.compile_launch(case.launch, target)
            report = None
        return index, report, time.perf_counter() - start, ""
    except Exception as err:  # noqa: BLE001 - one failing compile is a row, not the run
        return index, None, time.perf_counter() - start, f"{type(err).__name__}: {err}"[:300]


def compile_all(problems, target: str, *, jobs: int, read: bool, on_result=None,
                limit: int | None = None):
    """Compiles every distinct binary of ``problems`` on ``target`` in ``jobs`` processes.

    Args:
        problems: the Problems whose launches are compiled.
        target: "sm_80" / "sm_90a" / "sm_100a".
        jobs: worker processes (spawned: each imports torch and triton once).
        read: read each cubin (registers, spills, shared memory, MMA) or only compile (warm
            the cache).
        on_result: called with (index, report, seconds, error) as each compile finishes.
        limit: compile only the first ``limit`` distinct binaries (a dry run).
    Returns:
        (cases, keys, results): every case, compile key -> first case index, and
        index -> (report, seconds, error) for those first cases.
    """
    cases = build_cases(problems, target)
    keys = unique_keys(cases, target)
    args = (problems, target, read)
    results = {}
    todo = sorted(keys.values())[:limit]
    if jobs <= 1:
        _init_worker(*args)
        done = map(_compile_one, todo)
        for index, report, seconds, error in done:
            results[index] = (report, seconds, error)
            if on_result:
                on_result(index, report, seconds, error)
        return cases, keys, results
    with multiprocessing.get_context("spawn").Pool(jobs, _init_worker, args) as pool:
        for index, report, seconds, error in pool.imap_unordered(_compile_one, todo):
            results[index] = (report, seconds, error)
            if on_result:
                on_result(index, report, seconds, error)
    return cases, keys, results
