"""Draws a benchmark plot from a results CSV alone (the latest run in it by default).

    python bench/plot.py bench/results/op_cpu.csv [--out bench/results/op_cpu.png]

One panel per mode; per shape, one bar per provider: median time as a multiple of base
(the frozen GEMM alone), with the p20-p80 spread as an error bar.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_rows(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def plot_latest_run(csv_path: Path, out_path: Path, run_id: str | None = None) -> Path:
    """Plots the rows of ``run_id`` (default: the newest run in the CSV) to ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    run_id = run_id or max(r["run_id"] for r in rows)
    rows = [r for r in rows if r["run_id"] == run_id]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    shapes = list(dict.fromkeys((r["M"], r["K"], r["N"], r["r"]) for r in rows))

    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    width = 0.8 / len(providers)
    for ax, mode in zip(axes[0], modes):
        for i, prov in enumerate(providers):
            ratios, lo, hi = [], [], []
            for shape in shapes:
                match = [r for r in rows if r["mode"] == mode and r["provider"] == prov
                         and (r["M"], r["K"], r["N"], r["r"]) == shape]
                base = [r for r in rows if r["mode"] == mode and r["provider"] == "base"
                        and (r["M"], r["K"], r["N"], r["r"]) == shape]
                if not match or not base:
                    ratios.append(float("nan"))
                    lo.append(0)
                    hi.append(0)
                    continue
                b = float(base[0]["median_ms"])
                med = float(match[0]["median_ms"])
                ratios.append(med / b)
                lo.append((med - float(match[0]["p20_ms"])) / b)
                hi.append((float(match[0]["p80_ms"]) - med) / b)
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(xs, ratios, width, yerr=[lo, hi], label=prov, capsize=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"M={s[0]}\nK={s[1]} N={s[2]}\nr={s[3]}" for s in shapes], fontsize=8)
        ax.set_ylabel("median time / base")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first['bench']} {first['dtype']} - {first['device']} - {first['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--run-id", default=None)
    args = ap.parse_args(argv)
    print(plot_latest_run(args.csv, args.out or args.csv.with_suffix(".png"), args.run_id))


if __name__ == "__main__":
    main()
