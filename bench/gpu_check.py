"""Everything a lent GPU should run, in one device call of at most 6 minutes on a cold machine
(docs/gpu.md gives the exact call): `make gpu-check` [OUT=dir], with that machine's own
packages (torch 2.11, triton 3.6, transformers 5.17, peft; no package registry).

    python bench/gpu_check.py [--out DIR] [--dry-run]      DIR defaults to $OUT, else runs/gpu-check

Steps, in order of value, each a subprocess under its own time limit; every line they print
goes to stdout and to DIR/gpu_check.log as it comes:
  1. build  pip install --no-build-isolation --no-deps -e .  (the compiler's version first;
            Ninja when make is absent: setup.py)
  2. warm   bench/gpu_warm.py: Triton's cache for every launch of steps 3 and 4, one compiling
            process per core
  3. op     bench/op_gpu.py with the fixed configs: prefill 8192x4096 -> 4096 and -> 11008,
            decode M = 1 and 16 (K = N = 4096); forward and fwd+bwd; base, fused, two_gemm,
            peft; then the LoRA dropout rows. Each row is appended to DIR/op_gpu.csv (and
            op_gpu_dropout.csv) and printed as it completes; a failing provider is a row with
            its error
  4. clients  bench/clients.py on CUDA, bf16: 8 clients x 128 rows (prefill) and x 1 row
            (decode) at 4096 -> 4096, rank 16 per branch; base, batched (lora_linear_banked),
            per_client, peft (adapter_names) -> DIR/clients_op_gpu.csv
  5. model  bench/model.py on CUDA, 4 blocks, 3 repeats, fixed configs -> DIR/model_gpu.csv
  6. tests  tests/kernels/test_kernels_triton_gpu.py under pytest-xdist (one worker per core;
            the GPU-only checks first, the reference matrix last) -> DIR/tests.xml
Then DIR/summary.md, which stdout also ends with: versions, steps, the op table with ratios
against the targets, the many-clients table, the model table and the failed tests with their
one-line errors. DIR holds at most 7 files (the device call returns at most 8).

--dry-run runs the same steps on a CPU without CUDA (CI: tests/bench/test_gpu_check.py): no
build, warm compiles its first binaries for sm_90a, op_gpu.py runs in Triton's interpreter on
tiny shapes (skipped, saying why, where the interpreter cannot run: Triton 3.6 with
numpy >= 2.4), a tiny CPU model, the GPU tests report their skips. Its numbers are CPU
wall-clock times, never GPU figures.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

OP_SHAPES = ["8192x4096x4096", "8192x4096x11008", "1x4096x4096", "16x4096x4096"]
OP_PROVIDERS = ["base", "fused", "two_gemm", "peft"]
OP_MODES = ["forward", "fwd+bwd"]
# The clients step: 8 clients' rows in one banked call (bench/clients.py), rank 16 per branch.
CLIENTS, CLIENT_ROWS, CLIENT_SHAPE, CLIENT_RANK = 8, [128, 1], "4096,4096", 16
# Seconds per step on the GPU machine, 345 in all: the call stays under 6 minutes with the
# summary, and a rerun fits in the 15 minutes of device time (docs/gpu.md).
LIMITS = {"build": 90, "warm": 45, "op": 75, "clients": 15, "model": 40, "tests": 80}
DRY_RUN_LIMIT_FACTOR = 4  # a 2-core CPU runs the interpreter and compiles far slower
OUT_FILES = ["summary.md", "gpu_check.log", "op_gpu.csv", "op_gpu_dropout.csv",
             "clients_op_gpu.csv", "model_gpu.csv", "tests.xml"]


def steps(out: Path, dry_run: bool, jobs: int) -> list[tuple[str, list[str], dict]]:
    """(name, command, extra environment) of every step, in order."""
    py = sys.executable
    fixed = {"FEDDPA_FAST_AUTOTUNE": "0"}  # fixed configs: what the warm step compiled
    build = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    warm = [py, "bench/gpu_warm.py", "--jobs", str(jobs)] + (["--dry-run"] if dry_run else [])
    op = [py, "bench/op_gpu.py", "--csv", str(out / "op_gpu.csv"), "--no-plot",
          "--modes", *OP_MODES, "--providers", *OP_PROVIDERS]
    op += ["--dry-run", "--dropout-shapes", "64x48x40"] if dry_run else [
        "--shapes", *OP_SHAPES, "--dropout-shapes", OP_SHAPES[0]]
    clients = [py, "bench/clients.py", "--csv", str(out / "clients_op_gpu.csv"), "--no-plot",
               "--clients", str(CLIENTS), "--modes", *OP_MODES]
    clients += (["--device", "cpu", "--shapes", "64,48", "--rows", "4", "1", "--r", "8",
                 "--reps", "3"] if dry_run else
                ["--device", "cuda", "--dtype", "bfloat16", "--shapes", CLIENT_SHAPE,
                 "--rows", *map(str, CLIENT_ROWS), "--r", str(CLIENT_RANK), "--reps", "20"])
    # The model step runs with the authors' LoRA dropout (0.05): in-op, materialised, PEFT.
    model = [py, "bench/model.py", "--csv", str(out / "model_gpu.csv"), "--no-plot",
             "--dropout", "0.05"]
    model += (["--device", "cpu", "--layers", "1", "--hidden", "128", "--heads", "4",
               "--kv-heads", "4", "--vocab", "256", "--seq", "32", "--batch", "2",
               "--repeats", "2"] if dry_run else
              ["--device", "cuda", "--layers", "4", "--repeats", "3"])
    tests = [py, "-m", "pytest", "tests/kernels/test_kernels_triton_gpu.py", "-q", "-rs",
             "-p", "no:cacheprovider", "-n", str(jobs), "--junitxml", str(out / "tests.xml")]
    listed = [("warm", warm, {}), ("op", op, dict(fixed, TRITON_INTERPRET="1") if dry_run
                                   else fixed),
              ("clients", clients, fixed), ("model", model, fixed), ("tests", tests, fixed)]
    return listed if dry_run else [("build", build, {})] + listed


def run_step(name: str, cmd: list[str], env_extra: dict, log, limit: float) -> dict:
    """Runs one step, streaming its output to stdout and the log; kills it (and its children)
    at ``limit`` seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    if "TRITON_INTERPRET" not in env_extra:
        env.pop("TRITON_INTERPRET", None)
    banner = f"== {name}: {' '.join(cmd)} (limit {limit:.0f} s)"
    for sink in (sys.stdout, log):
        print(banner, file=sink, flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    last = [""]

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if line.strip():
                last[0] = line.strip()
        sys.stdout.flush()
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out after {limit:.0f} s"
    reader.join(timeout=10)
    seconds = round(time.time() - start, 1)
    for sink in (sys.stdout, log):
        print(f"== {name}: {status} in {seconds} s", file=sink, flush=True)
    return {"step": name, "status": status, "seconds": seconds, "tail": last[0]}


def interpreter_problem(python: str = sys.executable) -> str | None:
    """None when Triton's interpreter runs the op here (forward and backward on CPU tensors, as
    the op step's dry run does), else the error. Triton 3.6's interpreter fails inside numpy
    >= 2.4 on some kernels (int() of a one-element array); the GPU image pairs it with numpy
    2.5. Probed in a fresh process."""
    probe = ("import torch\n"
             "from feddpa_fast.kernels import lora_linear, triton_op\n"
             "triton_op.serve_for_process('cpu')\n"
             "for m in (3, 67):\n"
             "    x = torch.randn(m, 64, requires_grad=True)\n"
             "    a = torch.randn(8, 64, requires_grad=True)\n"
             "    y = lora_linear(x, torch.randn(96, 64), None, a, torch.randn(96, 8),\n"
             "                    torch.ones(1, 8), backend='triton')\n"
             "    y.sum().backward()\n"
             "    assert torch.isfinite(y).all() and a.grad is not None\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([python, "-c", probe], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"rc {proc.returncode}"


def planned_estimate() -> list[str]:
    """The printed time estimate for a cold GPU machine (bench/gpu_budget.py)."""
    import gpu_budget
    import gpu_launches
    import gpu_warm
    from gpu_launches import Problem

    def counts(problems) -> dict[str, int]:
        cases = gpu_launches.build_cases(problems, "sm_90a")
        out: dict[str, int] = {}
        for index in gpu_launches.unique_keys(cases, "sm_90a").values():
            out[cases[index].dtype] = out.get(cases[index].dtype, 0) + 1
        return out

    tests = [Problem(m, k, n, r, dtype, "test") for dtype in ("bf16", "fp16", "fp32")
             for (m, k, n, r) in gpu_launches.GPU_TEST_PROBLEMS]
    calls = {"prefill": 0, "decode": 0}
    for shape in OP_SHAPES:
        kind = "decode" if int(shape.split("x")[0]) <= 64 else "prefill"
        calls[kind] += len(OP_MODES) * len(OP_PROVIDERS)
    lines, total, first_row = gpu_budget.estimate(
        {"warm": counts(gpu_warm.op_problems() + gpu_warm.clients_problems()
                        + gpu_warm.model_problems()),
         "tests": counts(tests)}, calls, LIMITS)
    verdict = (f"estimate {total:.0f} s (budget 360 s), first op row after {first_row:.0f} s "
               f"(budget 180 s): {'within' if total <= 360 and first_row <= 180 else 'OVER'}")
    return lines + [verdict]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu-check"),
                    help="directory for the CSVs, the log and the summary (default $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU, no CUDA")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compiling processes and test workers (default: one per core)")
    args = ap.parse_args(argv)
    # The estimate compiles nothing but specialises real launches: the kernels must be
    # Triton's JIT functions, not the interpreter's (only the op dry run sets it, per step).
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    import gpu_summary
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # this run's files only (a rerun into the same DIR)
        (out / name).unlink(missing_ok=True)
    info = gpu_summary.versions()
    print("versions: " + "; ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    # The estimate plans real launches, which needs the built package: first thing in a dry
    # run (installed), right after the build step on the GPU machine.
    estimate = _estimate() if args.dry_run else []
    # A cache of its own: what the warm step compiles is what the later steps find, and the
    # entries a step adds are the launches the warm-up missed.
    cache = Path(tempfile.mkdtemp(prefix="feddpa-gpu-check-triton-"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    results = []
    factor = DRY_RUN_LIMIT_FACTOR if args.dry_run else 1
    with open(out / "gpu_check.log", "w") as log:
        for name, cmd, env in steps(out, args.dry_run, args.jobs):
            if name == "op" and args.dry_run and (problem := interpreter_problem()):
                results.append({"step": name, "status": "skipped", "seconds": 0.0,
                                "tail": f"Triton's interpreter cannot run here: {problem}"})
                print(f"== op: skipped: Triton's interpreter cannot run here ({problem})",
                      flush=True)
                continue
            before = _entries(cache)
            result = run_step(name, cmd, env, log, LIMITS[name] * factor)
            if name in ("op", "model"):
                result["tail"] = (f"{_entries(cache) - before} compiles not covered by warm; "
                                  + result["tail"])
            results.append(result)
            if name == "build" and result["status"] != "ok":
                break
            if name == "build":
                estimate = _estimate()
    shutil.rmtree(cache, ignore_errors=True)
    text = gpu_summary.render(out, results, info, args.dry_run, estimate)
    (out / "summary.md").write_text(text)
    print("\n" + text, flush=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


def _estimate() -> list[str]:
    """The printed estimate; a failure to make it is reported, never fatal to the check."""
    try:
        lines = planned_estimate()
    except Exception as err:  # noqa: BLE001 - the GPU check goes on without its estimate
        lines = [f"estimate failed: {type(err).__name__}: {err}"]
    print("\n".join(lines), flush=True)
    return lines


def _entries(cache: Path) -> int:
    return sum(1 for _ in cache.iterdir()) if cache.exists() else 0


if __name__ == "__main__":
    sys.exit(main())
