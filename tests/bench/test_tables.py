"""bench/tables.py: bench/README.md's tables come from the CSVs, and the committed page is what
the committed CSVs give (so a hand edit or a stale table fails here)."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "tables.py"


def run_tables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


OP_RUN = {"run_id": "20990101T000000", "date": "2099-01-01", "device": "Test CPU (3 cores)",
          "threads": "3", "torch": "9.9.9", "feddpa_fast": "0.1.0", "bench": "op_cpu",
          "dtype": "float32", "M": "67", "K": "48", "N": "40", "r": "8", "mode": "forward"}


def fixture(results: Path) -> None:
    """A tiny op_cpu.csv (one run, two providers), a robustness CSV and an unknown CSV."""
    results.mkdir()
    write_csv(results / "op_cpu.csv", [
        {**OP_RUN, "provider": "base", "median_ms": "12.3456", "p20_ms": "12.0", "p80_ms": "13.0",
         "tflops": "0.4321", "ratio_to_base": "1.0000"},
        {**OP_RUN, "provider": "fused", "median_ms": "13.5791", "p20_ms": "13.1", "p80_ms": "14.2",
         "tflops": "0.3927", "ratio_to_base": "1.1000"},
    ])
    base = {"run_id": "20990102T000000", "date": "2099-01-02", "device": "Test CPU (3 cores)",
            "torch": "9.9.9", "feddpa_fast": "0.1.0", "config": "fedit clients=3", "clip_norm": "",
            "P_all": "0.5", "TTP_all": "0.5", "wall_s": "1.0"}
    write_csv(results / "robustness_cpu.csv", [
        {**base, "attack": "none", "rule": "median", "P_honest": "0.61234", "TTP_honest": "0.625"},
        {**base, "attack": "scale", "rule": "median", "P_honest": "0.5", "TTP_honest": "0.4375"},
    ])
    write_csv(results / "mystery.csv", [{"date": "2099-01-03", "device": "Test CPU (3 cores)",
                                         "answer": "42"}])


def test_tables_take_their_values_from_the_csvs(tmp_path):
    results = tmp_path / "results"
    fixture(results)
    template = tmp_path / "template.md"
    template.write_text("# Head\n\nHand-written intro.\n\n<!-- table:op_cpu -->\n\n"
                        "<!-- table:robustness_cpu -->\n\n<!-- table:op_gpu -->\n")
    out = tmp_path / "README.md"
    proc = run_tables("--results", str(results), "--template", str(template), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.splitlines()[2:5] == ["# Head", "", "Hand-written intro."]
    # op_cpu: date, device, versions above the table; median, TFLOP/s and ratio from the CSV
    assert ("**Run `20990101T000000`**: 2099-01-01, Test CPU (3 cores), 3 threads, "
            "torch 9.9.9") in text
    assert "| 67, 48, 40, 8 | forward | base | 12.346 [12.000, 13.000] | 0.432 | 1.000 |" in text
    assert "| 67, 48, 40, 8 | forward | fused | 13.579 [13.100, 14.200] | 0.393 | 1.100 |" in text
    # robustness: honest P / TTP in %, an attack per column
    assert "| rule | none | scale |" in text
    assert "| median | 61.23 / 62.50 | 50.00 / 43.75 |" in text
    assert "2099-01-02" in text
    # a missing CSV is said to be missing; a CSV no marker names is still shown, in full
    assert "_No rows yet: `results/op_gpu.csv` does not exist._" in text
    assert "## Other results" in text and "### `mystery`" in text
    assert "| 2099-01-03 | Test CPU (3 cores) | 42 |" in text
    # deterministic: the same inputs give the same bytes, and --check agrees
    first = out.read_bytes()
    assert run_tables("--results", str(results), "--template", str(template),
                      "--out", str(out)).returncode == 0
    assert out.read_bytes() == first
    assert run_tables("--results", str(results), "--template", str(template), "--out", str(out),
                      "--check").returncode == 0
    out.write_text(text.replace("12.346", "11.111"))  # a hand edit
    assert run_tables("--results", str(results), "--template", str(template), "--out", str(out),
                      "--check").returncode == 1


def test_real_results_render_their_rows(tmp_path):
    out = tmp_path / "README.md"
    proc = run_tables("--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    for name in ("op_cpu", "op_cpu_dropout", "model_cpu", "model_smollm2_cpu", "llm_step_cpu",
                 "robustness_cpu", "gpu_static"):
        assert f"Rows: [`results/{name}.csv`](results/{name}.csv)." in text, name
    # values taken from the CSVs (median and ratio rounded to the tables' digits)
    with open(ROOT / "bench" / "results" / "op_cpu.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["provider"] == "fused")
    assert f"| fused | {float(row['median_ms']):.3f} [" in text
    assert f"| {float(row['tflops']):.3f} | {float(row['ratio_to_base']):.3f} |" in text
    assert "| sm_90a | fwd | prefill M=8192 K=4096 N=4096 R=32 | 128x256x64 r32 w8 s3 |" in text
    assert "## Other results" not in text  # every committed CSV has its own section


def test_committed_page_is_generated_from_committed_csvs():
    proc = run_tables("--check")
    assert proc.returncode == 0, (
        "bench/README.md is not what bench/tables.py generates from bench/results/*.csv and "
        "bench/README.template.md: run `make bench-tables` (never edit its tables by hand)")


def test_script_runs_without_torch():
    code = (f"import runpy, sys; sys.argv = ['tables.py', '--check']\n"
            f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            f"except SystemExit:\n    pass\n"
            f"assert 'torch' not in sys.modules, 'bench/tables.py imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
