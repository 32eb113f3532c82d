"""`make gpu-check`'s script (bench/gpu_check.py) end to end on the CPU: --dry-run runs the same
steps (GPU tests, op benchmark in Triton's interpreter, model benchmark) and writes the CSVs
and the summary, so the one-call GPU script is known to run before a GPU is lent."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # the whole GPU script under the interpreter (about 45 s)
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path),
                           "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("tests", "op", "model"):
        assert f"| {step} | ok |" in summary
    assert "DRY RUN" in summary and "fused / base" in summary
    rows = list(csv.DictReader(open(tmp_path / "op_gpu.csv")))
    assert {r["device"] for r in rows} == {"cpu (dry run)"}
    seen = {(r["M"], r["mode"], r["provider"]) for r in rows}
    for m in ("64", "3"):
        for mode in ("forward", "fwd+bwd"):
            for provider in ("base", "fused", "fused_pertile", "two_gemm", "peft"):
                assert (m, mode, provider) in seen
    # Forward accuracy of every Triton provider against the fp32 reference (interpreter).
    for r in rows:
        if r["mode"] == "forward" and r["provider"] != "base":
            assert float(r["max_abs_err"]) < 1e-4, r
    assert (tmp_path / "model_gpu.csv").exists()
    assert "skipped" in (tmp_path / "tests.log").read_text()  # no CUDA here: skips reported
