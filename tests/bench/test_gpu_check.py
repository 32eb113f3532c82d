"""`make gpu-check`'s script (bench/gpu_check.py) end to end on the CPU: --dry-run runs the same
steps in the same order (warm, op benchmark in Triton's interpreter, model benchmark, GPU
tests), saves rows as they come, and ends its output with the summary, so the one-call GPU
script is known to run before a GPU is lent. Plus its parts: the interpreter probe, the
summary's tables and test results, the time estimate and the build's generator choice."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import gpu_summary  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    """gpu_check.main edits os.environ (drops TRITON_INTERPRET, which this session's
    interpreter tests need, and sets TRITON_CACHE_DIR): monkeypatch puts both back."""
    for name in ("TRITON_INTERPRET", "TRITON_CACHE_DIR"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


def _dry_run(out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(out),
                           "--dry-run", "--jobs", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow  # the whole GPU script under the interpreter (about 2 minutes)
def test_gpu_check_dry_run(tmp_path):
    proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    out = proc.stdout
    # The estimate comes first, the steps in order of value, the summary last.
    order = [out.index(s) for s in ("estimate for a cold machine", "== warm:", "== op:",
                                    "== clients:", "== model:", "== tests:",
                                    "# gpu-check DRY RUN")]
    assert order == sorted(order), order
    assert "within" in out.split("== warm:")[0]  # the estimate fits 6 min / 3 min
    summary = (tmp_path / "summary.md").read_text()
    assert out.rstrip().endswith(summary.rstrip())
    for step in ("warm", "op", "clients", "model", "tests"):
        assert f"| {step} | ok |" in summary, summary
    assert "versions: torch" in summary and "cmake" in summary
    assert "## many clients in one call" in summary and "| 8 x 4, 64, 48 | forward |" in summary
    # At most 7 files directly under OUT (the device call returns 8), none below.
    files = sorted(p.name for p in tmp_path.iterdir())
    assert set(files) <= set(gpu_check.OUT_FILES) and len(files) <= 7, files
    assert all(p.is_file() for p in tmp_path.iterdir())
    # Rows were printed as they completed, before the op step ended.
    op_part = out.split("== op:")[1].split("== op: ok")[0]
    assert op_part.count("\nrow M=") >= 2 * 2 * len(gpu_check.OP_PROVIDERS)
    rows = list(csv.DictReader(open(tmp_path / "op_gpu.csv")))
    assert {r["device"] for r in rows} == {"cpu (dry run)"}
    seen = {(r["M"], r["mode"], r["provider"]) for r in rows if r["median_ms"]}
    for m in ("64", "3"):
        for mode in ("forward", "fwd+bwd"):
            for provider in gpu_check.OP_PROVIDERS:
                assert (m, mode, provider) in seen
    for r in rows:  # forward accuracy of every Triton provider (interpreter)
        if r["mode"] == "forward" and r["provider"] != "base":
            assert float(r["max_abs_err"]) < 1e-4, r
    assert list(csv.DictReader(open(tmp_path / "model_gpu.csv")))
    assert list(csv.DictReader(open(tmp_path / "op_gpu_dropout.csv")))
    assert "passed" in summary.split("## GPU tests")[1] and "skipped" in summary
    assert "compiles not covered by warm" in summary


def test_interpreter_probe_runs_here_and_reports_a_broken_one(tmp_path):
    assert gpu_check.interpreter_problem() is None  # this machine's Triton + numpy work
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'TypeError: only 0-dimensional arrays can be "
                      "converted to Python scalars' >&2\nexit 1\n")
    broken.chmod(0o755)
    assert "0-dimensional" in gpu_check.interpreter_problem(str(broken))


def test_dry_run_skips_the_interpreter_steps_where_it_cannot_run(tmp_path, monkeypatch):
    """On the GPU image's stack (Triton 3.6, numpy >= 2.4) the dry run says why the op step
    cannot run and goes on (the probe is replaced; the rest of the run is real)."""
    monkeypatch.setattr(gpu_check, "interpreter_problem", lambda: "TypeError: numpy 2.5")
    monkeypatch.setattr(gpu_check, "LIMITS", dict(gpu_check.LIMITS))
    ran = []
    monkeypatch.setattr(gpu_check, "run_step", lambda name, *a, **k: ran.append(name) or {
        "step": name, "status": "ok", "seconds": 0.0, "tail": ""})
    monkeypatch.setattr(gpu_check, "planned_estimate", lambda: ["estimate"])
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 0
    assert ran == ["warm", "clients", "model", "tests"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| op | skipped |" in summary and "numpy 2.5" in summary


def test_out_defaults_to_the_device_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "from-env"))
    seen = {}
    monkeypatch.setattr(gpu_check, "run_step", lambda name, cmd, env, log, limit: seen.update(
        {name: cmd}) or {"step": name, "status": "ok", "seconds": 0.0, "tail": ""})
    monkeypatch.setattr(gpu_check, "planned_estimate", lambda: ["estimate"])
    monkeypatch.setattr(gpu_check, "interpreter_problem", lambda: None)
    assert gpu_check.main(["--dry-run"]) == 0
    assert (tmp_path / "from-env" / "summary.md").exists()
    assert str(tmp_path / "from-env" / "op_gpu.csv") in seen["op"]


def test_a_step_over_its_limit_is_killed_with_its_children(tmp_path):
    log = open(tmp_path / "log", "w")
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
            "'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"
    result = gpu_check.run_step("slow", [sys.executable, "-c", child], {}, log, limit=3)
    assert result["status"] == "timed out after 3 s" and result["tail"] == "started"
    assert result["seconds"] < 20


def _write(path, fields, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_summary_op_table_ratios_targets_and_failures(tmp_path):
    fields = ["M", "K", "N", "mode", "provider", "median_ms", "error"]
    rows = [dict(M="8192", K="4096", N="4096", mode="forward", provider="base", median_ms="1.0"),
            dict(M="8192", K="4096", N="4096", mode="forward", provider="fused",
                 median_ms="1.05"),
            dict(M="8192", K="4096", N="4096", mode="forward", provider="peft",
                 median_ms="2.1"),
            dict(M="1", K="4096", N="4096", mode="forward", provider="base", median_ms="0.010"),
            dict(M="1", K="4096", N="4096", mode="forward", provider="fused",
                 median_ms="0.012"),
            dict(M="1", K="4096", N="4096", mode="forward", provider="peft",
                 error="ImportError: no peft")]
    _write(tmp_path / "op.csv", fields, rows)
    text = "\n".join(gpu_summary.op_table(tmp_path / "op.csv"))
    assert "1.050 (met: <= 1.08)" in text          # prefill forward
    assert "2.000 (met: >= 1.6)" in text           # peft / fused at prefill
    assert "1.200 (missed: <= 1.1)" in text        # decode forward
    assert "failed: peft at 1, 4096, 4096, forward: ImportError: no peft" in text


def test_summary_reads_failed_tests_from_junit(tmp_path):
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite><testcase name="test_a"/>'
        '<testcase name="test_b"><failure message="AssertionError: y differs\nmore">x'
        '</failure></testcase><testcase name="test_c"><skipped message="no"/></testcase>'
        '</testsuite></testsuites>')
    lines = gpu_summary.test_results(tmp_path / "t.xml")
    assert lines[0] == "1 passed, 1 failed, 1 skipped"
    assert lines[1] == "- test_b: AssertionError: y differs more"
    assert "missing" in gpu_summary.test_results(tmp_path / "none.xml")[0]


def test_estimate_within_budget_and_counts_compiles():
    # A process of its own: the test session runs Triton's interpreter, the estimate needs the
    # JIT functions (as gpu_check.main arranges).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", "import gpu_check; print('\\n'.join("
                           "gpu_check.planned_estimate()))"], cwd=ROOT / "bench",
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    text = "\n".join(lines)
    assert "| warm |" in text and "| tests |" in text and "first op row" in text
    assert lines[-1].endswith("within"), text
    warm = next(line for line in lines if line.startswith("| warm |"))
    assert int(warm.split("|")[2]) > 10  # the op and model steps' distinct binaries
    assert sum(gpu_check.LIMITS.values()) <= 345


def _setup_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("feddpa_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


def test_build_uses_ninja_where_make_is_absent():
    gen = _setup_module().generator_args
    tools = {"make": "/usr/bin/make", "ninja": "/usr/bin/ninja"}
    assert gen(which=tools.get, env={}) == []
    assert gen(which={"ninja": "/usr/bin/ninja"}.get, env={}) == ["-G", "Ninja"]
    assert gen(which={}.get, env={"CMAKE_GENERATOR": "Unix Makefiles"}) == []
    with pytest.raises(RuntimeError, match="make or ninja"):
        gen(which={}.get, env={})


def test_real_run_builds_first_then_estimates_and_stops_on_a_failed_build(tmp_path, monkeypatch):
    """The GPU machine's path (CUDA faked, every step replaced): the build comes first, the
    estimate (which plans real launches, so needs the built package) right after it, then
    warm, op, model and tests; a failed build ends the run with its summary."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_summary, "versions", lambda: {"gpu": "fake"})
    events = []
    monkeypatch.setattr(gpu_check, "planned_estimate",
                        lambda: events.append("estimate") or ["estimate line"])

    def step(status):
        return lambda name, *a, **k: events.append(name) or {
            "step": name, "status": status, "seconds": 0.0, "tail": ""}

    monkeypatch.setattr(gpu_check, "run_step", step("ok"))
    assert gpu_check.main(["--out", str(tmp_path / "a")]) == 0
    assert events == ["build", "estimate", "warm", "op", "clients", "model", "tests"]
    assert "estimate line" in (tmp_path / "a" / "summary.md").read_text()
    events.clear()
    monkeypatch.setattr(gpu_check, "run_step", step("failed (rc 1)"))
    assert gpu_check.main(["--out", str(tmp_path / "b")]) == 1
    assert events == ["build"]
    assert "| build | failed (rc 1) |" in (tmp_path / "b" / "summary.md").read_text()


def test_clients_table_reads_the_targets(tmp_path):
    path = tmp_path / "clients_op_gpu.csv"
    fields = ["clients", "rows_per_client", "M", "K", "N", "mode", "provider", "median_ms"]
    rows = [(128, "forward", "base", 1.0), (128, "forward", "batched", 1.05),
            (128, "forward", "per_client", 2.0), (128, "forward", "peft", 1.5),
            (1, "forward", "base", 0.01), (1, "forward", "batched", 0.02),
            (1, "forward", "peft", 0.08)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for per, mode, provider, ms in rows:
            writer.writerow({"clients": 8, "rows_per_client": per, "M": 8 * per, "K": 4096,
                             "N": 4096, "mode": mode, "provider": provider, "median_ms": ms})
    text = "\n".join(gpu_summary.clients_table(path))
    assert "| 8 x 128, 4096, 4096 | forward |" in text and "1.050 (met: <= 1.1)" in text
    assert "4.000 (met: >= 3.0)" in text  # peft / batched at decode
    assert "missing" in gpu_summary.clients_table(tmp_path / "none.csv")[0]
