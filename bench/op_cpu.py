"""CPU benchmark of the lora_linear op: base (the floor), unfused (PEFT-style PyTorch), peft
(the real library, two adapters) and fused (the native op), forward and forward+backward;
then LoRA dropout at fwd+bwd: fused without it, fused_dropout (in-op), materialised_dropout
(the dropped copy materialised, torch ops) and peft_dropout, with the bytes each saves for
backward.

    python bench/op_cpu.py [--reps N] [--shapes M,K,N,r ...] [--dropout-shapes M,K,N,r ...]
                           [--dropout P] [--no-plot]

All providers are timed in the same process, in alternation, after warm-up; the median and
p20/p80 go to bench/results/op_cpu.csv (one row per shape, mode and provider, with the device,
date and versions), the dropout rows to bench/results/op_cpu_dropout.csv, and
bench/results/op_cpu.png is redrawn from the CSV.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import op_dropout  # noqa: E402
import plot  # noqa: E402
from providers import build_providers, flops, make_problem  # noqa: E402

import feddpa_fast  # noqa: E402

DEFAULT_SHAPES = [(1024, 2048, 2048, 16), (4096, 1024, 1024, 8), (256, 384, 384, 8),
                  (32, 4096, 4096, 16)]
PROVIDERS = ["base", "unfused", "peft", "fused"]
MODES = ["forward", "fwd+bwd"]
CSV_PATH = common.RESULTS_DIR / "op_cpu.csv"
# r = 16 per branch: R = 32 stacked, the (2048, 1024, 1024, R 32).
DROPOUT_SHAPES = [(2048, 1024, 1024, 16)]
DROPOUT_CSV = common.RESULTS_DIR / "op_cpu_dropout.csv"


def parse_shape(text: str) -> tuple[int, int, int, int]:
    m, k, n, r = (int(v) for v in text.split(","))
    return m, k, n, r


def reps_for(m, k, n, r, mode) -> int:
    """Enough repetitions for a stable median without spending minutes on the big shapes."""
    gflop = flops(m, k, n, r, mode, "fused") / 1e9
    return max(15, min(200, int(60 / max(gflop, 1e-3))))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", type=parse_shape, default=DEFAULT_SHAPES)
    ap.add_argument("--dropout-shapes", nargs="*", type=parse_shape, default=DROPOUT_SHAPES,
                    help="shapes of the dropout rows (r per branch; none to skip them)")
    ap.add_argument("--dropout", type=float, default=0.05, help="p of the dropout rows")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default: by size)")
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device("cpu")
    meta = {
        "run_id": common.new_run_id(), "date": common.today(),
        "device": common.device_name(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "feddpa_fast": feddpa_fast.__version__,
        "bench": "op_cpu", "dtype": "float32",
    }
    rows = []
    for (m, k, n, r) in args.shapes:
        problem = make_problem(m, k, n, r)
        for mode in MODES:
            fns = build_providers(problem, mode, PROVIDERS)
            samples = common.time_alternating(fns, args.reps or reps_for(m, k, n, r, mode))
            base_median = common.quantiles(samples["base"])[0]
            for name in PROVIDERS:
                med, p20, p80 = common.quantiles(samples[name])
                rows.append({**meta, "M": m, "K": k, "N": n, "r": r, "mode": mode,
                             "provider": name, "median_ms": f"{med:.4f}",
                             "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}",
                             "tflops": f"{flops(m, k, n, r, mode, name) / med / 1e9:.4f}",
                             "ratio_to_base": f"{med / base_median:.4f}"})
            print(f"done {m},{k},{n},{r} {mode}", file=sys.stderr, flush=True)
    common.append_rows(args.csv, rows)
    print(f"# {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"{meta['date']} (fwd+bwd of base = forward + dx)")
    print(common.markdown_table(rows, PROVIDERS))
    if args.dropout_shapes:
        def time_all(fns, shape):
            reps = args.reps or reps_for(*shape, "fwd+bwd")
            samples = common.time_alternating(fns, reps)
            return {name: common.quantiles(s) for name, s in samples.items()}
        drop_rows = op_dropout.rows(args.dropout_shapes, args.dropout, meta, time_all)
        common.append_rows(args.csv.with_name(DROPOUT_CSV.name), drop_rows, op_dropout.FIELDS)
        print(f"# LoRA dropout p = {args.dropout}, fwd+bwd, a fresh mask every call")
        print(op_dropout.table(drop_rows))
    if not args.no_plot:
        out = plot.plot_latest_run(args.csv, args.csv.with_suffix(".png"))
        print(f"plot: {out}")
    return rows


if __name__ == "__main__":
    main()
