"""Static GPU report: every Triton kernel of the project, at every config the dispatcher or the
autotuner can choose for the GPU benchmark's shapes (plus odd shapes), compiled ahead of time
for sm_80 (A100), sm_90a (H100, H200) and, where the installed Triton can, sm_100a. No GPU is
needed: kernels/triton_static.py compiles each real launch plan (the launchers' own argument
lists, tensors on the meta device) with Triton's own specialisation and reads the cubin.

    python bench/gpu_static.py                  full report (make gpu-static)
    python bench/gpu_static.py --gate           the bounded subset the CI test runs
    python bench/gpu_static.py --gate --banked  the banked op's rows of it alone

Per kernel, config and target: registers, spill bytes and STL/LDL count, shared memory against
the arch limit, the matrix instruction (HGMMA / HMMA / tcgen05), TMA loads (UTMALDG), the
schedule's tensor-core work beyond the plain GEMM (extra_mma_frac, from the grid and tiles),
programs per launch against the target's SMs, and atomic adds per output element.
Rows go to bench/results/gpu_static.csv (replaced per Triton version); exit status 1 when the
gate fails: a spill, a shared-memory overflow, or an sm_90a prefill kernel without HGMMA. At
the odd (unaligned) shapes an autotune candidate that fails is marked "pruned": the
autotuner's prune compiles the same launch and drops it, so it can never be chosen there.
Must run without TRITON_INTERPRET (the kernels are compiled, not interpreted).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench/gpu_static.py compiles kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gpu_launches  # noqa: E402
from gpu_launches import Problem  # noqa: E402

from feddpa_fast.kernels import triton_schedule, triton_static  # noqa: E402

CSV_PATH = common.RESULTS_DIR / "gpu_static.csv"
FIELDS = ["date", "triton", "target", "dtype", "kernel", "case", "config", "source", "regs",
          "spill_bytes", "stl", "ldl", "smem_bytes", "smem_limit", "mma", "tma",
          "extra_mma_frac", "programs", "sms", "atomics_per_elem", "compile_s", "ok"]
R = 32  # the benchmark's two branches of rank 16, stacked
PREFILL = [(m, k, n, R) for m in (2048, 8192) for (k, n) in ((4096, 4096), (4096, 11008),
                                                              (11008, 4096))]
DECODE = [(m, 4096, n, R) for m in (1, 16, 64) for n in (4096, 11008)]
ODD = [(67, 1000, 1030, 8), (67, 1000, 1030, 48), (1, 1000, 1030, 8), (1, 1000, 1030, 48)]
TARGETS = ["sm_80", "sm_90a", "sm_100a"]
# The banked op (bench/gpu_launches_banked.py): (M, K, N, r, B, clients), serving-style (one
# shared global and ``clients`` locals, two branches of rank 16: J = 32 as the plain op's R).
BANKED_PREFILL = [(2048, 4096, 4096, 16, 2, 8), (8192, 4096, 11008, 16, 2, 32)]
BANKED_DECODE = [(1, 4096, 4096, 16, 2, 1), (16, 4096, 4096, 16, 2, 8),
                 (64, 4096, 11008, 16, 2, 32)]
BANKED_ODD = [(67, 1000, 1030, 8, 2, 5), (67, 1000, 1030, 24, 2, 5), (1, 1000, 1030, 8, 2, 1)]


def banked_problems(gate: bool, target: str) -> list[Problem]:
    """The banked op's problems: the first prefill (every autotune candidate of its GEMM),
    decode at M = 1 and 16, the odd shapes and (the gate) the GPU tests' banked shapes; the
    full report every shape. Dtypes as for the plain op."""
    from gpu_launches_banked import BANKED_GPU_TEST_PROBLEMS
    dtypes = ["bf16"] if gate and target == "sm_80" else list(gpu_launches.DTYPES)
    shapes = [(s, "prefill" if s[0] > 64 else "decode", True) for s in (
        BANKED_PREFILL[:1] + BANKED_DECODE[:2] if gate else BANKED_PREFILL + BANKED_DECODE)]
    shapes += [(s, "odd", False) for s in BANKED_ODD]
    if gate:
        shapes += [(s, "test", False) for s in BANKED_GPU_TEST_PROBLEMS]
    return [Problem(m, k, n, r, dtype, kind, autotune=tune, branches=b, clients=c)
            for dtype in dtypes for (m, k, n, r, b, c), kind, tune in shapes]


def problems(gate: bool, target: str, banked_only: bool = False) -> list[Problem]:
    """The problems of every dtype: the benchmark shapes with every autotune candidate and the
    measured alternatives, the odd (unaligned) shapes (the full report with their autotune
    candidates), and (the gate) every shape the GPU tests launch. The gate keeps one prefill
    and decode at M = 1, 16 and 64 (one row bucket each) of the benchmark shapes, and on sm_80
    (no such GPU is lent) bf16 only: about 10 minutes on 2 cores instead of 20."""
    if banked_only:
        return banked_problems(gate, target)
    bench = PREFILL[3:4] + DECODE[::2] if gate else PREFILL + DECODE
    dtypes = ["bf16"] if gate and target == "sm_80" else list(gpu_launches.DTYPES)
    out = []
    for dtype in dtypes:
        out += [Problem(m, k, n, r, dtype, "prefill" if m > 64 else "decode", autotune=True,
                        alternatives=True) for (m, k, n, r) in bench]
        out += [Problem(m, k, n, r, dtype, "odd", autotune=not gate) for (m, k, n, r) in ODD]
        if gate:
            out += [Problem(m, k, n, r, dtype, "test")
                    for (m, k, n, r) in gpu_launches.GPU_TEST_PROBLEMS]
    return out + banked_problems(gate, target)


def judge(row: dict, prefill: bool) -> str:
    """'ok', or why the gate fails this row."""
    problems = []
    if int(row["spill_bytes"]) or int(row["stl"]) or int(row["ldl"]):
        problems.append("spills")
    if int(row["smem_bytes"]) > int(row["smem_limit"]):
        problems.append("shared memory overflow")
    if prefill and row["target"] == "sm_90a" and row["mma"] != "HGMMA":
        problems.append(f"{row['mma']} instead of HGMMA")
    return "; ".join(problems) or "ok"


def run(targets, gate: bool, jobs: int, banked_only: bool = False) -> list[dict]:
    """Rows of every target: each target's distinct binaries compiled by ``jobs`` processes
    (``banked_only``: the banked op's launches alone)."""
    supported = [t for t in targets if triton_static.target_supported(t)]
    for t in set(targets) - set(supported):
        print(f"# {t}: not supported by this Triton ({triton.__version__}), skipped")
    rows = []
    for target in supported:
        start = time.time()
        cases, keys, results = gpu_launches.compile_all(problems(gate, target, banked_only),
                                                        target, jobs=jobs, read=True)
        rows += target_rows(target, cases, keys, results)
        print(f"# {target}: {len(cases)} launches, {len(keys)} distinct binaries, "
              f"{time.time() - start:.0f} s with {jobs} processes", flush=True)
    return rows


def target_rows(target: str, cases, keys: dict, results: dict) -> list[dict]:
    """One row per case; cases sharing a binary share its report (compile_s on the first)."""
    rows = []
    for index, c in enumerate(cases):
        first = keys[triton_static.compile_key(c.launch, target)]
        rep, seconds, error = results[first]
        row = {"date": common.today(), "triton": triton.__version__, "target": target,
               "dtype": c.dtype, "kernel": c.kernel, "case": c.case, "config": c.config,
               "source": c.source, "smem_limit": triton_schedule.SMEM_LIMIT[target],
               "extra_mma_frac": f"{c.extra_mma_frac:.4f}",
               "programs": _programs(c.launch.grid), "sms": triton_schedule.SMS[target],
               "atomics_per_elem": c.atomics_per_elem,
               "compile_s": f"{seconds:.2f}" if index == first else ""}
        if rep is None:
            row.update(regs=0, spill_bytes=0, stl=0, ldl=0, smem_bytes=0, mma="none", tma="no",
                       ok=f"compile failed: {error}")
            rows.append(row)
            continue
        row.update(regs=rep.regs, spill_bytes=rep.spill_bytes, stl=rep.stl, ldl=rep.ldl,
                   smem_bytes=rep.smem_bytes, mma=rep.mma, tma="yes" if rep.tma else "no")
        row["ok"] = judge(row, c.prefill)
        if row["ok"] != "ok" and c.source == "autotune" and c.case.startswith("odd"):
            # Unaligned shapes: the autotuner's prune (the same compile) drops this config,
            # so it is not one the autotuner can choose.
            row["ok"] = f"pruned ({row['ok']})"
        rows.append(row)
    return rows


def _programs(grid) -> int:
    total = 1
    for g in grid:
        total *= g
    return total


def write_csv(path: Path, rows: list[dict]) -> None:
    """Replaces this Triton version's rows, keeps the other versions' (3.6 vs 3.9 side by side)."""
    versions = {r["triton"] for r in rows}
    kept = []
    if path.exists():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r.get("triton") not in versions]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(kept + rows)
    os.replace(tmp, path)


def markdown(rows: list[dict]) -> str:
    """The dispatched configs at the big prefill and decode M = 1 (bench/tables.py renders
    bench/README.md from the CSV)."""
    head = ("| triton | target | kernel | case | config | regs | spill B | smem KB (limit) | "
            "mma | TMA | extra MMA | programs / SMs |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        if r["source"] not in ("dispatched", "fixed", "alternative") or r["dtype"] != "bf16":
            continue
        if not (r["case"].startswith("prefill M=8192 K=4096 N=4096") or
                r["case"].startswith("decode M=1 K=4096 N=4096")):
            continue
        out.append(f"| {r['triton']} | {r['target']} | {r['kernel']} | {r['case']} | "
                   f"{r['config']} | {r['regs']} | {r['spill_bytes']} | "
                   f"{int(r['smem_bytes']) / 1024:.0f} ({int(r['smem_limit']) / 1024:.0f}) | "
                   f"{r['mma']} | {r['tma']} | {100 * float(r['extra_mma_frac']):.2f} % | "
                   f"{r['programs']} / {r['sms']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", action="store_true", help="the bounded CI subset (sm_80, sm_90a)")
    ap.add_argument("--targets", default=None, help="comma-separated, default all")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compiling processes (default: one per core)")
    ap.add_argument("--banked", action="store_true",
                    help="only the banked op's launches (lora_linear_banked); writes no CSV "
                    "unless --csv is given")
    ap.add_argument("--csv", type=Path, default=None,
                    help=f"default {CSV_PATH} (the gate writes no CSV unless given)")
    args = ap.parse_args(argv)
    targets = args.targets.split(",") if args.targets else (
        ["sm_80", "sm_90a"] if args.gate else TARGETS)
    start = time.time()
    # A cache of its own, empty: every binary is compiled, never read from an earlier run's
    # cache, so compile_s is a cold compile (the GPU check's estimate reads it).
    cache = tempfile.mkdtemp(prefix="gpu-static-triton-")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        rows = run(targets, args.gate, args.jobs, args.banked)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    csv_path = args.csv or (None if args.gate or args.banked else CSV_PATH)
    if csv_path:
        write_csv(csv_path, rows)
    print(markdown(rows))
    bad = [r for r in rows if r["ok"] != "ok" and not r["ok"].startswith("pruned")]
    for r in bad:
        print(f"GATE FAIL {r['target']} {r['kernel']} {r['case']} {r['config']}: {r['ok']}")
    print(f"# {len(rows)} rows, {len(bad)} failing, triton {triton.__version__}, "
          f"{time.time() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
