"""Warms Triton's on-disk cache for every launch of the GPU check's benchmark steps (the op,
clients and model steps of bench/gpu_check.py, fixed configs), compiling in one process per core
before anything is timed: step 2 of `make gpu-check` (docs/gpu.md, "Warming Triton's cache").

    python bench/gpu_warm.py [--jobs N]          on the GPU machine: its own target
    python bench/gpu_warm.py --dry-run           no GPU: the first binaries for sm_90a

Each launch is compiled by ``triton.compile`` with the launch's own specialisation (Triton's
binder, kernels/triton_static.py) and the device's target, which is how a real launch compiles
it: the real launch then finds the binary in the cache. Prints the distinct binaries, the
compile seconds (sum and slowest) and the wall time. --dry-run compiles only the first
``--limit`` binaries (default 4): it checks the pool and the enumeration, not the GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_launches  # noqa: E402
from gpu_launches import Problem  # noqa: E402

R = 32  # the benchmarks' two branches of rank 16, stacked


def op_problems() -> list[Problem]:
    """The op step's shapes in bf16 (bench/gpu_check.py's OP_SHAPES), every launch of the
    op (forward, backward, in-op dropout) and the split alternative."""
    from gpu_check import OP_SHAPES
    out = []
    for shape in OP_SHAPES:
        m, k, n = (int(v) for v in shape.split("x"))
        out.append(Problem(m, k, n, R, "bf16", "prefill" if m > 64 else "decode",
                           alternatives=True))
    return out


def clients_problems() -> list[Problem]:
    """The clients step's launches (bench/gpu_check.py): the banked op at 8 clients x 128 rows
    and x 1 row, and the per-client provider's plain op at 128 rows (its 1-row calls are the op
    step's decode M = 1)."""
    from gpu_check import CLIENT_RANK, CLIENT_ROWS, CLIENT_SHAPE, CLIENTS
    k, n = (int(v) for v in CLIENT_SHAPE.split(","))
    out = [Problem(CLIENTS * rows, k, n, CLIENT_RANK, "bf16",
                   "prefill" if CLIENTS * rows > 64 else "decode", branches=2, clients=CLIENTS)
           for rows in CLIENT_ROWS]
    return out + [Problem(rows, k, n, 2 * CLIENT_RANK, "bf16", "prefill")
                  for rows in CLIENT_ROWS if rows > 64]


def model_problems() -> list[Problem]:
    """The model step's linear layers: the GPU config of bench/model.py (--layers does not
    change the shapes), M = batch x seq rows, q/k/v/o/gate/up/down, bf16."""
    from model import GPU
    head_dim = GPU["hidden"] // GPU["heads"]
    hidden, inter, kv = GPU["hidden"], GPU["intermediate"], GPU["kv_heads"] * head_dim
    m = GPU["batch"] * GPU["seq"]
    layers = {(hidden, hidden), (hidden, kv), (hidden, inter), (inter, hidden)}
    return [Problem(m, k, n, R, "bf16", "model") for (k, n) in sorted(layers)]


def device_target() -> str:
    """The static report's name of the current CUDA device's architecture."""
    import torch

    from feddpa_fast.kernels.triton_config import arch_of
    return arch_of(torch.device("cuda"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: compile the first --limit binaries for sm_90a")
    ap.add_argument("--limit", type=int, default=4, help="binaries compiled by --dry-run")
    args = ap.parse_args(argv)
    target = "sm_90a" if args.dry_run else device_target()
    problems = op_problems() + clients_problems() + model_problems()
    cases = gpu_launches.build_cases(problems, target)
    keys = gpu_launches.unique_keys(cases, target)
    print(f"warm: {len(cases)} launches, {len(keys)} distinct binaries for {target}, "
          f"{args.jobs} processes", flush=True)
    start, seconds, failures = time.time(), [], []

    def done(index, report, secs, error):
        seconds.append(secs)
        if error:
            failures.append(error)
            print(f"warm: compile failed: {error}", flush=True)

    # The dry run compiles the first binaries only: it checks the enumeration and the pool.
    gpu_launches.compile_all(problems, target, jobs=args.jobs, read=False, on_result=done,
                             limit=args.limit if args.dry_run else None)
    print(f"warm: {len(seconds)} binaries compiled in {time.time() - start:.1f} s wall "
          f"({sum(seconds):.1f} s of compiles, slowest {max(seconds, default=0):.1f} s), "
          f"{len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
