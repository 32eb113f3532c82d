"""bench/llm_step.py runs end to end on SmolLM2 over a lexical suite built from fixture files
and appends a row per measure, dtype and variant (slow: it loads the real model)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


@pytest.mark.slow
def test_llm_step_benchmark_writes_before_and_after_rows(tmp_path):
    from lexical_fixtures import write_sources

    from feddpa_fast.fed.lexical import write_lexical

    wordnet, dictd = write_sources(tmp_path / "raw")
    write_lexical(tmp_path / "suite", wordnet_dir=wordnet, dictd_dir=dictd, train_per_task=3,
                  test_per_task=2)
    out_csv = tmp_path / "llm_step.csv"
    cmd = [sys.executable, str(ROOT / "bench" / "llm_step.py"), "--data", str(tmp_path / "suite"),
           "--batch", "2", "--reps", "2", "--eval-size", "8", "--set-size", "2",
           "--max-new-tokens", "3", "--dtypes", "fp32,bf16", "--variants", "before,after",
           "--out", str(out_csv)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["measure"], r["dtype"], r["variant"]) for r in rows] == [
        (m, d, v) for m in ("train_step", "eval_throughput") for d in ("fp32", "bf16")
        for v in ("before", "after")]
    assert all(float(r["median"]) > 0 and r["device"] and r["date"] for r in rows)
    assert [float(r["ratio_to_before"]) for r in rows if r["variant"] == "before"] == [1.0] * 4
    assert [float(r["ratio_to_fp32"]) for r in rows if r["dtype"] == "fp32"] == [1.0] * 4
    assert all(float(r["ratio_to_fp32"]) > 0 for r in rows if r["dtype"] == "bf16")
    assert "| train_step (ms, batch 2) | bf16 | after |" in done.stdout
