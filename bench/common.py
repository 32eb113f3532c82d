"""Shared pieces of the benchmark scripts: timing statistics, machine description, the
long-format CSV the results are appended to, and the markdown table printed at the end.

Every script appends one row per (shape, mode, provider) with the device name, date, versions
and a run id, so that results from different machines and days live side by side and plots are
drawn from the CSV alone (bench/plot.py).
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

CSV_FIELDS = [
    "run_id", "date", "device", "threads", "torch", "feddpa_fast", "bench", "dtype",
    "M", "K", "N", "r", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "tflops",
    "ratio_to_base",
]


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """Human-readable device name for the CSV: GPU name on CUDA, CPU model on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of timings."""
    qs = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return statistics.median(samples_ms), qs[1], qs[7]


def time_alternating(fns: dict, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Times each callable ``reps`` times in alternation (the order rotates every repetition,
    so no provider always runs right after the same neighbour), after ``warmup`` calls each.
    Returns the per-call wall times in milliseconds. ``fns`` values may return a callable
    ``setup`` to run before each timed call (e.g. clearing gradients), outside the timing."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def new_run_id() -> str:
    """A sortable id shared by all rows of one benchmark invocation."""
    return _dt.datetime.now().strftime("%Y%m%dT%H%M%S")


def today() -> str:
    return _dt.date.today().isoformat()


def append_rows(path: Path, rows: list[dict], fields: list[str] = CSV_FIELDS) -> None:
    """Appends rows to the long-format CSV (writing the header when the file is new). A file
    written with other columns (an older script) is first rewritten, atomically, under the
    union of both headers, so no row loses a value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != fields:
            fields = header + [f for f in fields if f not in header]
            _rewrite(path, fields)
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
        fh.flush()


def _rewrite(path: Path, fields: list[str]) -> None:
    with path.open(newline="") as fh:
        old = list(csv.DictReader(fh))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in fields} for row in old)
    os.replace(tmp, path)


def markdown_table(rows: list[dict], providers: list[str]) -> str:
    """One line per (shape, mode): median ms per provider and the ratio of each to base."""
    keys = []
    for row in rows:
        key = (row["M"], row["K"], row["N"], row["r"], row["mode"])
        if key not in keys:
            keys.append(key)
    head = "| M, K, N, r | mode | " + " | ".join(f"{p} ms (x base)" for p in providers) + " |"
    lines = [head, "|" + "---|" * (2 + len(providers))]
    for key in keys:
        cells = []
        for p in providers:
            match = [r for r in rows if (r["M"], r["K"], r["N"], r["r"], r["mode"]) == key
                     and r["provider"] == p]
            if match and not match[0].get("median_ms"):
                cells.append("failed")
            elif match:
                r = match[0]
                ratio = r.get("ratio_to_base")
                cells.append(f"{float(r['median_ms']):.3f}"
                             + (f" ({float(ratio):.3f})" if ratio else ""))
            else:
                cells.append("-")
        lines.append(f"| {key[0]}, {key[1]}, {key[2]}, {key[3]} | {key[4]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def lexical_suite(path: Path | None) -> Path:
    """``path`` (a lexical suite directory, ``feddpa-fast data build-lexical``), or a new one
    built from the Debian packages into a temporary directory when it is None."""
    if path is not None:
        return path
    from feddpa_fast.fed.lexical import write_lexical

    out = Path(tempfile.mkdtemp(prefix="lexical-"))
    write_lexical(out)
    return out
