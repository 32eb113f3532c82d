"""Autotuning of the forward-family kernels on CUDA (never in the interpreter or the static
report, which use fixed configs: kernels/triton_config.py).

- Configs: ``fwd_candidates(arch)`` / ``decode_candidates(arch, m)``, pruned per problem by
  ``prune``: a config is dropped when the static compile of that very launch for the current
  GPU's architecture (kernels/triton_static.py) spills registers or needs more shared memory
  than the device gives one program. At least one config always survives (the one using the
  least shared memory).
- Key: (M bucket, N, K, R) and the mode flags; Triton's autotuner caches the winner per key
  (and on disk, with TRITON_CACHE_AUTOTUNING=1).
- The grid follows the chosen tiles (triton_schedule), so each config is timed with the
  schedule it would really run.
Only the forward, the GEMM (dx, the split) and decode kernels are tuned; the backward's dy and
dA kernels keep
their fixed tiles (kernels/triton_config.py).
"""
from __future__ import annotations

import dataclasses

import torch
import triton

from . import triton_schedule, triton_static
from .triton_config import (
    FwdConfig,
    arch_of,
    autotune_enabled,
    decode_candidates,
    fwd_candidates,
    padded_rank,
    sm_count,
)
from .triton_launch import Launch, set_tma_allocator

# The constexpr modes that key a winner, next to (M bucket, N, K, R): each kernel's own.
_MODE_KEYS = ["HAS_BIAS", "EXPAND", "STORE_U", "USE_TMA", "W_T", "PRECISION"]
_STATIC_CACHE: dict = {}


def _smem_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or \
        triton_schedule.SMEM_LIMIT.get(arch_of(device), 166912)


def _to_triton(cfg: FwdConfig) -> triton.Config:
    return triton.Config({"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                          "BLOCK_K": cfg.block_k}, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)


def prune(configs, named_args, kernel, arch: str, smem_limit: int, **kwargs):
    """Configs whose static compile for ``arch`` (the current GPU's) neither spills nor needs
    more than ``smem_limit`` bytes of shared memory. An architecture the static compiler does
    not know keeps every config (Triton's own launch then reports what does not fit)."""
    target = arch if arch in triton_static.TARGETS else None
    # Triton's Autotuner hands the prune every keyword of the call, launch options (grid,
    # warmup) included: only the kernel's own arguments describe the compile.
    args = {k: v for k, v in {**named_args, **kwargs}.items() if k in kernel.arg_names}
    kept, reports = [], []
    for config in configs:
        launch = Launch(kernel, (1,), {**args, **config.kwargs}, config.num_warps,
                        config.num_stages)
        key = triton_static.compile_key(launch, arch)
        if key not in _STATIC_CACHE:
            _STATIC_CACHE[key] = triton_static.compile_report(launch, target) if target else None
        report = _STATIC_CACHE[key]
        reports.append((report.smem_bytes if report else 0, config))
        if report is None or (not report.spills and report.smem_bytes <= smem_limit):
            kept.append(config)
    return kept or [min(reports, key=lambda item: item[0])[1]]


_TUNERS: dict = {}


def _tuner(kind: str, kernel, configs, keys, device):
    """One triton.autotune wrapper per (kind, arch, config list)."""
    arch, limit = arch_of(device), _smem_limit(device)
    ident = (kind, arch, tuple(dataclasses.astuple(c) for c in configs))
    if ident not in _TUNERS:
        _TUNERS[ident] = triton.autotune(
            configs=[_to_triton(c) for c in configs], key=keys,
            prune_configs_by={"early_config_prune":
                              lambda cs, nargs, **kw: prune(cs, nargs, kernel, arch, limit,
                                                            **kw)},
        )(kernel)
    return _TUNERS[ident]


def _keys(kernel) -> list[str]:
    return ["m_bucket", "N", "K", "R"] + [k for k in _MODE_KEYS if k in kernel.arg_names]


def run_tuned(launch: Launch, device: torch.device, fixed_cfg: FwdConfig | None,
              computes_u: bool) -> None:
    """Runs a forward-family Launch: with its own tiles, or through the CUDA autotuner (tiles
    from META, the grid from the schedule of each candidate)."""
    if launch.args["USE_TMA"]:
        set_tma_allocator()
    if fixed_cfg is not None or device.type != "cuda" or not autotune_enabled():
        launch.run()
        return
    run_forward(launch, device, computes_u)


def run_forward(launch, device: torch.device, computes_u: bool) -> None:
    """Runs a forward or GEMM Launch through the autotuner (tiles chosen per key)."""
    args = dict(launch.args)
    r = args["R"]
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        args.pop(name)
    sms = sm_count(device)
    m, n = args["M"], args["N"]

    def grid(meta):
        return (triton_schedule.forward_schedule(m, n, meta["BLOCK_M"], meta["BLOCK_N"],
                                                 meta["BLOCK_R"], sms, computes_u).programs,)

    configs = fwd_candidates(arch_of(device), max(r, 1), launch.args["x_ptr"].dtype,
                             launch.args["USE_TMA"], gemm=not computes_u)
    tuner = _tuner(launch.kernel.fn.__name__, launch.kernel, configs, _keys(launch.kernel),
                   device)
    tuner[grid](**args)


def decode_schedules(m: int, n: int, k: int, r: int, device: torch.device,
                     dtype: torch.dtype):
    """The decode schedule of every candidate: the launch's partials must hold the largest
    split, and its counters the most column tiles."""
    sms = sm_count(device)
    return [triton_schedule.decode_schedule(m, n, k, c.block_m, c.block_n, c.block_k,
                                            c.block_r, sms)
            for c in decode_candidates(arch_of(device), m, r, dtype)]


def run_decode(launch, device: torch.device) -> None:
    """Runs a decode Launch (planned with room for every candidate's split: triton_decode
    forward) through the autotuner."""
    a = launch.args
    m, n, k, r = a["M"], a["N"], a["K"], a["R"]
    sms = sm_count(device)
    configs = decode_candidates(arch_of(device), m, r, a["x_ptr"].dtype)
    args = {key: v for key, v in a.items() if key not in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    block_r = padded_rank(r)

    def grid(meta):
        s = triton_schedule.decode_schedule(m, n, k, meta["BLOCK_M"], meta["BLOCK_N"],
                                            meta["BLOCK_K"], block_r, sms)
        return (s.col_tiles, s.chunks)

    tuner = _tuner("decode", launch.kernel, configs, _keys(launch.kernel), device)
    tuner[grid](**args)
