"""The summary `make gpu-check` ends its output with (and writes to OUT/summary.md): the
versions, each step's status, the op table with its ratios against the GPU targets, the
many-clients table, the model table, and every failed test with its one-line error. Read from
the files the steps wrote (op_gpu.csv, clients_op_gpu.csv, model_gpu.csv, tests.xml), so a step
that was cut still shows what it saved."""
from __future__ import annotations

import csv
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

# The GPU targets, bf16, ratios in one run (docs/gpu.md): the op's from bench/op_gpu.py, the
# model's from bench/model.py. (what, limit, "<=" or ">=")
OP_TARGETS = {"prefill forward": (1.08, "<="), "prefill fwd+bwd": (1.15, "<="),
              "decode forward": (1.10, "<="), "peft / fused prefill forward": (1.6, ">=")}
# Many clients in one call (bench/clients.py, 8 clients): batched / base at prefill, and
# peft (adapter_names) / batched at decode, forward.
CLIENTS_TARGETS = {"batched / base prefill forward": (1.10, "<="),
                   "peft / batched decode forward": (3.0, ">=")}
MODEL_TARGETS = {"fused forward / base": (1.08, "<="),
                 "train step speedup vs peft_two": (1.5, ">=")}
# kernels/triton_config.py's DECODE_MAX_M, repeated: the summary is rendered even when the build
# failed, so it imports nothing of the package.
DECODE_MAX_M = 64


def versions() -> dict[str, str]:
    """torch, CUDA, triton, numpy, transformers, peft, the GPU, gcc, cmake, ninja, make."""
    out = {}
    for name in ("torch", "triton", "numpy", "transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - a missing package is a version line too
            out[name] = f"missing ({type(err).__name__})"
    import torch
    out["cuda"] = str(torch.version.cuda)
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    for tool in ("gcc", "c++", "cmake", "ninja", "make"):
        out[tool] = _tool_version(tool)
    return out


def _tool_version(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        return "absent"
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        first = (proc.stdout or proc.stderr).strip().splitlines()
        return first[0] if first else "present"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"present ({type(err).__name__})"


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ms(row: dict | None) -> float | None:
    return float(row["median_ms"]) if row and row.get("median_ms") else None


def _verdict(value: float | None, target) -> str:
    if value is None:
        return "no figure"
    limit, sense = target
    met = value <= limit if sense == "<=" else value >= limit
    return f"{value:.3f} ({'met' if met else 'missed'}: {sense} {limit})"


def op_table(csv_path: Path) -> list[str]:
    """One line per (shape, mode): each provider's median ms, fused's ratio against its target,
    and peft / fused at prefill forward. Failed providers show their error."""
    rows = _rows(csv_path)
    if not rows:
        return ["no op rows (op_gpu.csv is missing or empty)"]
    by = {(r["M"], r["K"], r["N"], r["mode"], r["provider"]): r for r in rows}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines = ["| M, K, N | mode | " + " | ".join(f"{p} ms" for p in providers)
             + " | fused vs target | peft / fused |", "|---" * (4 + len(providers)) + "|"]
    errors = []
    for shape_mode in dict.fromkeys((r["M"], r["K"], r["N"], r["mode"]) for r in rows):
        cells = []
        for p in providers:
            row = by.get((*shape_mode, p))
            if row and row.get("error"):
                errors.append(f"{p} at {', '.join(shape_mode)}: {row['error']}")
            cells.append(f"{_ms(row):.4f}" if _ms(row) else ("failed" if row else "-"))
        m, mode = int(shape_mode[0]), shape_mode[3]
        fused, base = _ms(by.get((*shape_mode, "fused"))), _ms(by.get((*shape_mode, "base")))
        kind = "decode" if m <= DECODE_MAX_M else "prefill"
        target = OP_TARGETS.get(f"{kind} {mode}")
        # base's fwd+bwd row is its forward + dx: the floor the fwd+bwd target names.
        ratio = fused / base if fused and base else None
        versus = _verdict(ratio, target) if target else (f"{ratio:.3f}" if ratio else "-")
        peft = _ms(by.get((*shape_mode, "peft")))
        speedup = "-"
        if peft and fused:
            speedup = (_verdict(peft / fused, OP_TARGETS["peft / fused prefill forward"])
                       if kind == "prefill" and mode == "forward" else f"{peft / fused:.2f}")
        lines.append(f"| {', '.join(shape_mode[:3])} | {mode} | " + " | ".join(cells)
                     + f" | {versus} | {speedup} |")
    return lines + [f"- failed: {e}" for e in errors]


def clients_table(csv_path: Path) -> list[str]:
    """One line per (clients x rows, mode): each provider's median ms, batched / base and
    peft / batched, against the many-clients targets."""
    rows = _rows(csv_path)
    if not rows:
        return ["no clients rows (clients_op_gpu.csv is missing or empty)"]
    by = {(r["clients"], r["rows_per_client"], r["mode"], r["provider"]): r for r in rows}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines = ["| clients x rows, K, N | mode | " + " | ".join(f"{p} ms" for p in providers)
             + " | batched / base | peft / batched |", "|---" * (4 + len(providers)) + "|"]
    for key in dict.fromkeys((r["clients"], r["rows_per_client"], r["mode"]) for r in rows):
        ms = {p: _ms(by.get((*key, p))) for p in providers}
        first = by[next((*key, p) for p in providers if (*key, p) in by)]
        kind = "decode" if int(first["M"]) <= DECODE_MAX_M else "prefill"
        ratio = ms["batched"] / ms["base"] if ms.get("batched") and ms.get("base") else None
        target = CLIENTS_TARGETS.get(f"batched / base {kind} {key[2]}")
        versus = _verdict(ratio, target) if target else (f"{ratio:.3f}" if ratio else "-")
        speedup = ms["peft"] / ms["batched"] if ms.get("peft") and ms.get("batched") else None
        target = CLIENTS_TARGETS.get(f"peft / batched {kind} {key[2]}")
        peft = _verdict(speedup, target) if target else (f"{speedup:.2f}" if speedup else "-")
        cells = [f"{v:.4f}" if v else "-" for v in ms.values()]
        lines.append(f"| {key[0]} x {key[1]}, {first['K']}, {first['N']} | {key[2]} | "
                     + " | ".join(cells) + f" | {versus} | {peft} |")
    return lines


def model_table(csv_path: Path) -> list[str]:
    """Per provider: forward and train-step ms, their ratios, and the model targets."""
    rows = _rows(csv_path)
    if not rows:
        return ["no model rows (model_gpu.csv is missing or empty)"]
    run = rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run]
    lines = ["| provider | forward ms | x base | train step ms | speedup vs peft_two | peak MB |",
             "|---|---|---|---|---|---|"]
    get = {(r["provider"], r["mode"]): r for r in rows}
    for name in dict.fromkeys(r["provider"] for r in rows):
        fwd, train = get.get((name, "forward"), {}), get.get((name, "train_step"), {})
        if fwd.get("error"):
            lines.append(f"| {name} | failed: {fwd['error'][:100]} | | | | |")
            continue
        lines.append(f"| {name} | {fwd.get('median_ms', '-')} | {fwd.get('ratio_to_base', '-')} "
                     f"| {train.get('median_ms', '-')} | "
                     f"{train.get('speedup_vs_peft_two', '-')} | {train.get('peak_mb', '-')} |")
    fused_fwd = get.get(("fused", "forward"), {}).get("ratio_to_base")
    fused_train = get.get(("fused", "train_step"), {}).get("speedup_vs_peft_two")
    lines.append("- fused forward / base: " + _verdict(
        float(fused_fwd) if fused_fwd else None, MODEL_TARGETS["fused forward / base"]))
    lines.append("- fused train step speedup vs peft_two: " + _verdict(
        float(fused_train) if fused_train else None,
        MODEL_TARGETS["train step speedup vs peft_two"]))
    return lines


def test_results(xml_path: Path) -> list[str]:
    """Counts from pytest's JUnit XML, and each failed test with its one-line error."""
    if not xml_path.exists():
        return ["no test results (tests.xml is missing: the step did not finish)"]
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        return [f"tests.xml unreadable: {err}"]
    cases = list(root.iter("testcase"))
    failed, skipped = [], 0
    for case in cases:
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            message = " ".join((bad.get("message") or bad.text or "").split())
            failed.append(f"- {case.get('name')}: {message[:200]}")
        elif case.find("skipped") is not None:
            skipped += 1
    passed = len(cases) - len(failed) - skipped
    return [f"{passed} passed, {len(failed)} failed, {skipped} skipped"] + failed


def render(out: Path, steps: list[dict], info: dict[str, str], dry_run: bool,
           estimate: list[str]) -> str:
    """The whole summary as markdown."""
    lines = ["# gpu-check" + (" DRY RUN (CPU; Triton's interpreter: no GPU figures)"
                              if dry_run else ""), "",
             "versions: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
             "| step | status | seconds | last line |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['tail'][:100]} |"
              for s in steps]
    lines += ["", "## op (op_gpu.csv)", ""] + op_table(out / "op_gpu.csv")
    lines += ["", "## many clients in one call (clients_op_gpu.csv)", ""] + clients_table(
        out / "clients_op_gpu.csv")
    lines += ["", "## model (model_gpu.csv)", ""] + model_table(out / "model_gpu.csv")
    lines += ["", "## GPU tests (tests.xml)", ""] + test_results(out / "tests.xml")
    lines += ["", "## time estimate made before the run", ""] + estimate
    return "\n".join(lines) + "\n"
