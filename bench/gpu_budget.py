"""The time estimate `make gpu-check` prints before it starts: what a cold GPU machine (an
empty Triton cache, 16 cores) should spend per step, from figures measured without a GPU.

Per step: its distinct Triton compiles (bench/gpu_launches.py) x the mean sm_90a compile time
of that dtype, measured by the static report on the project's CPU (the ``compile_s`` column of
bench/results/gpu_static.csv) / the cores, plus the slowest single compile (one process
compiles it, whatever the core count); plus the process start (import of torch, triton and the
package, timed here and now); plus what the step's own script spends by design (do_bench's
warm-up and repetitions per timed call). The GPU's own run time is not known without a GPU, so
each step also has a hard limit (bench/gpu_check.py): the call can never exceed their sum.
"""
from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STATIC_CSV = common.RESULTS_DIR / "gpu_static.csv"
GPU_CORES = 16  # the lent machine's CPU cores (the device tool's machine description)
# bench/op_gpu.py's timing per timed call: do_bench(warmup=50 ms, rep=300 ms), or for decode
# forward two do_bench_cudagraph(rep=200 ms) calls (median, then quantiles).
PREFILL_CALL_S, DECODE_CALL_S = 0.35, 0.40
# The native library's build (pip install --no-build-isolation --no-deps -e .): 16 cores compile
# its five C++ files at once, so it takes about its slowest file plus CMake's configure, the
# link and pip. Measured on the project's CPU (AMD EPYC, 2026-12-07, beside a 2-process compile
# job, so upper bounds): ops.cpp 47.7 s, the others 22.8 / 21.8 / 20.3 / 1.8 s; the whole
# `pip wheel` on 2 cores 133 s.
BUILD_S = 60.0


def compile_means(path: Path = STATIC_CSV, target: str = "sm_90a") -> dict[str, tuple]:
    """{dtype: (mean s, max s, version)} of the static report's compile times on ``target``,
    from the Triton version closest to the GPU machine's (3.6) that has them."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("compile_s") and r["target"] == target]
    versions = sorted({r["triton"] for r in rows}, key=lambda v: (v != "3.6.0", v))
    if not versions:
        return {}
    rows = [r for r in rows if r["triton"] == versions[0]]
    out = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        secs = [float(r["compile_s"]) for r in rows if r["dtype"] == dtype]
        out[dtype] = (statistics.mean(secs), max(secs), versions[0])
    return out


def startup_s(python: str = sys.executable) -> float:
    """Seconds for a fresh process to import torch, triton and the package (measured now)."""
    start = time.perf_counter()
    subprocess.run([python, "-c", "import torch, triton, feddpa_fast.kernels"], check=False,
                   capture_output=True, timeout=120)
    return time.perf_counter() - start


def compile_share(counts: dict[str, int], means: dict[str, tuple], cores: int) -> float:
    """Wall seconds of compiling ``counts`` binaries per dtype in ``cores`` processes."""
    total = sum(n * means.get(d, (1.0, 1.0))[0] for d, n in counts.items())
    slowest = max((means.get(d, (1.0, 1.0))[1] for d in counts), default=0.0)
    return total / cores + slowest


def estimate(counts: dict[str, dict[str, int]], timed_calls: dict[str, int],
             limits: dict[str, int], cores: int = GPU_CORES) -> tuple[list[str], float, float]:
    """(printable lines, estimated seconds, seconds to the first op row).

    Args:
        counts: per step, distinct binaries per dtype it compiles.
        timed_calls: per kind ("prefill" / "decode"), the op step's timed calls.
        limits: per step, its hard limit in seconds.
    """
    means = compile_means()
    start = startup_s()
    est = {"build": BUILD_S}
    est["warm"] = start + compile_share(counts.get("warm", {}), means, cores)
    est["op"] = (start + compile_share(counts.get("op", {}), means, cores)
                 + timed_calls.get("prefill", 0) * PREFILL_CALL_S
                 + timed_calls.get("decode", 0) * DECODE_CALL_S)
    # The clients step's launches are warmed and its 20 repetitions per call are milliseconds.
    est["clients"] = start + compile_share(counts.get("clients", {}), means, cores)
    est["model"] = start + compile_share(counts.get("model", {}), means, cores)
    est["tests"] = 2 * start + compile_share(counts.get("tests", {}), means, cores)
    source = (f"Triton {next(iter(means.values()))[2]} compile times of {STATIC_CSV.name}"
              if means else "no compile times in gpu_static.csv: 1 s per compile assumed")
    lines = [f"estimate for a cold machine with {cores} cores ({source}; process start "
             f"{start:.1f} s measured here; GPU run time unknown without a GPU, capped by "
             "each step's limit):",
             "| step | binaries | estimate s | limit s |", "|---|---|---|---|"]
    for step, limit in limits.items():
        n = sum(counts.get(step, {}).values())
        over = " (over its limit)" if est.get(step, 0) > limit else ""
        lines.append(f"| {step} | {n} | {est.get(step, 0):.0f}{over} | {limit} |")
    total = sum(est.get(step, 0) for step in limits)
    first_row = est.get("build", 0) + est.get("warm", 0) + start + PREFILL_CALL_S
    lines.append(f"| all | | {total:.0f} | {sum(limits.values())} |")
    lines.append(f"first op row expected after {first_row:.0f} s")
    return lines, total, first_row
