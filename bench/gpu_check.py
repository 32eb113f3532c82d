"""Everything a lent GPU should run, in one call (make gpu-check OUT=dir): sized for one device
call of <= 8 minutes on an H100 / H200 with that machine's packages (torch 2.11, triton 3.6,
transformers 5.17, peft; no package registry).

    python bench/gpu_check.py --out DIR [--dry-run]

Steps, each a subprocess with its own time limit, its log under DIR:
  1. build:  pip install --no-build-isolation --no-deps -e .   (CMake, a compiler, torch there)
  2. tests:  pytest tests/kernels/test_kernels_triton_gpu.py (bf16/fp16/fp32 against the float64
             reference, outputs and every gradient), with autotuning on
  3. op:     bench/op_gpu.py on prefill 8192x4096x4096 and 8192x4096x11008, decode M = 1 and
             16 (K = N = 4096), modes forward and fwd+bwd, providers base, fused,
             fused_pertile, two_gemm, peft -> DIR/op_gpu.csv
  4. model:  a reduced bench/model.py on CUDA (4 blocks, 3 repeats) -> DIR/model_gpu.csv
  5. DIR/summary.md: each step's status and time, the op table with the ratios the targets
             name (fused / base forward, fwd+bwd / base forward + dx, decode, peft / fused).

--dry-run runs the same steps on the CPU without CUDA (CI does: tests/bench/test_gpu_check.py):
no build (the package is installed), the GPU tests report their skips, op_gpu.py runs its
--dry-run (Triton's interpreter, tiny shapes), the model benchmark a tiny CPU config. Its
numbers are wall-clock times of the CPU, never GPU figures.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OP_SHAPES = ["8192x4096x4096", "8192x4096x11008", "1x4096x4096", "16x4096x4096"]
OP_PROVIDERS = ["base", "fused", "fused_pertile", "two_gemm", "peft"]
OP_MODES = ["forward", "fwd+bwd"]
# Seconds per step on the GPU, 450 s in all (7.5 min, inside the 8-minute call); Triton
# compiles dominate the tests and benchmarks. None of these has been timed on a GPU yet.
LIMITS = {"build": 90, "tests": 150, "op": 150, "model": 60}


def steps(out: Path, dry_run: bool) -> list[tuple[str, list[str], dict]]:
    """(name, command, extra environment) of every step."""
    py = sys.executable
    interp = {"TRITON_INTERPRET": "1"} if dry_run else {}
    build = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    tests = [py, "-m", "pytest", "tests/kernels/test_kernels_triton_gpu.py", "-q", "-rs",
             "-p", "no:cacheprovider"]
    op = [py, "bench/op_gpu.py", "--csv", str(out / "op_gpu.csv"), "--no-plot",
          "--modes", *OP_MODES, "--providers", *OP_PROVIDERS]
    op += ["--dry-run", "--dropout-shapes", "64x48x40"] if dry_run else [
        "--shapes", *OP_SHAPES, "--dropout-shapes", OP_SHAPES[0]]
    # The model step runs with the authors' LoRA dropout (0.05): in-op, materialised, PEFT.
    model = [py, "bench/model.py", "--csv", str(out / "model_gpu.csv"), "--no-plot",
             "--dropout", "0.05"]
    model += (["--device", "cpu", "--layers", "1", "--hidden", "128", "--heads", "4",
               "--kv-heads", "4", "--vocab", "256", "--seq", "32", "--batch", "2",
               "--repeats", "2"] if dry_run else
              ["--device", "cuda", "--layers", "4", "--repeats", "3"])
    # The correctness tests use the fixed configs (autotuning every parametrised shape would
    # compile ~5 configs per key); one test turns autotuning on and compares.
    listed = [("tests", tests, {"FEDDPA_FAST_AUTOTUNE": "0"}), ("op", op, interp),
              ("model", model, {})]
    return listed if dry_run else [("build", build, {})] + listed


def _text(output) -> str:
    """A timed-out subprocess hands back bytes even in text mode."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def run_step(name, cmd, env_extra, out: Path, limit: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    if not env_extra.get("TRITON_INTERPRET"):
        env.pop("TRITON_INTERPRET", None)
    start = time.time()
    log = out / f"{name}.log"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        status, text = ("ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})",
                        proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as err:
        status = f"timed out after {limit} s"
        text = _text(err.stdout) + _text(err.stderr)
    log.write_text(" ".join(cmd) + "\n\n" + text)
    return {"step": name, "status": status, "seconds": round(time.time() - start, 1),
            "tail": text.strip().splitlines()[-1] if text.strip() else ""}


def target_ratios(csv_path: Path) -> list[str]:
    """The issue's target ratios from the op rows of this run (prefill / decode)."""
    if not csv_path.exists():
        return ["no op_gpu.csv rows"]
    rows = list(csv.DictReader(open(csv_path)))
    run_id = rows[-1]["run_id"] if rows else None
    rows = [r for r in rows if r["run_id"] == run_id]
    ms = {(r["M"], r["K"], r["N"], r["mode"], r["provider"]): float(r["median_ms"])
          for r in rows}
    lines = []
    for (m, k, n, mode, prov) in sorted(ms):
        if prov != "fused":
            continue
        base = ms.get((m, k, n, "forward", "base"))
        fused = ms[(m, k, n, mode, prov)]
        if mode == "forward" and base:
            lines.append(f"M={m} K={k} N={n} forward: fused / base = {fused / base:.3f}")
        if mode == "fwd+bwd" and (m, k, n, "fwd+bwd", "base") in ms:
            # base's fwd+bwd row is its forward + dx: the floor the target names.
            floor = ms[(m, k, n, "fwd+bwd", "base")]
            lines.append(f"M={m} K={k} N={n} fwd+bwd: fused / (base fwd + dx) = "
                         f"{fused / floor:.3f}")
        peft = ms.get((m, k, n, mode, "peft"))
        if peft:
            lines.append(f"M={m} K={k} N={n} {mode}: peft / fused = {peft / fused:.2f}x")
    return lines


def write_summary(out: Path, results: list[dict], dry_run: bool) -> Path:
    lines = [f"# gpu-check {'DRY RUN (CPU, interpreter: not GPU figures)' if dry_run else ''}",
             "", "| step | status | seconds | last line |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['tail'][:100]} |"
              for r in results]
    lines += ["", "## target ratios (op_gpu.csv, this run)", ""]
    lines += [f"- {line}" for line in target_ratios(out / "op_gpu.csv")]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for CSVs, logs, summary")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU, no CUDA")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
            return 2
    results = []
    for name, cmd, env in steps(args.out, args.dry_run):
        result = run_step(name, cmd, env, args.out, LIMITS[name] * (3 if args.dry_run else 1))
        results.append(result)
        print(f"{name}: {result['status']} in {result['seconds']} s", flush=True)
        if name == "build" and result["status"] != "ok":
            break
    summary = write_summary(args.out, results, args.dry_run)
    print(summary.read_text())
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
