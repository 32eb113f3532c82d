"""The CPU benchmark script runs end to end on a tiny shape, appends well-formed rows to its
CSV and draws the plot from that CSV alone."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_op_cpu_benchmark_writes_csv_and_plot(tmp_path):
    out_csv = tmp_path / "op_cpu.csv"
    cmd = [sys.executable, str(ROOT / "bench" / "op_cpu.py"), "--shapes", "8,32,24,4",
           "--reps", "3", "--csv", str(out_csv)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (m, p) for m in ("forward", "fwd+bwd") for p in ("base", "unfused", "peft", "fused")}
    for row in rows:
        assert row["device"] and row["date"] and row["torch"]
        assert float(row["median_ms"]) > 0
        assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
    base = [r for r in rows if r["provider"] == "base"]
    assert all(float(r["ratio_to_base"]) == 1.0 for r in base)
    assert out_csv.with_suffix(".png").stat().st_size > 1000
    assert "| 8, 32, 24, 4 | forward |" in done.stdout
