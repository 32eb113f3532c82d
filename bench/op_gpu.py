"""GPU benchmark of the lora_linear op (bf16): base (cuBLAS F.linear, the floor), unfused
(PEFT-style), peft (the real library, two adapters), two_gemm (LoRAFusion's split: a shrink
kernel, then a GEMM whose accumulator also takes (u*S) B^T), fused_pertile (the previous single
launch, one program per output tile) and fused (the Triton backend, as dispatched), in modes
forward, backward and fwd+bwd.

    python bench/op_gpu.py [--quick] [--no-plot]        (make bench-gpu)
    python bench/op_gpu.py --shapes 8192x4096x4096 1x4096x4096 --modes forward fwd+bwd
    python bench/op_gpu.py --dry-run                    CPU, Triton's interpreter, tiny shapes
    python bench/op_gpu.py --dropout-shapes 8192x4096x4096 [--dropout 0.05]
                           LoRA dropout rows (bench/op_dropout.py) -> op_gpu_dropout.csv

--dry-run (needs TRITON_INTERPRET=1 set before start) runs every provider and mode end to end
on tiny shapes with wall-clock timing, so the script itself is tested without a GPU; its rows
say device "cpu (dry run)" and are never GPU figures.

Timings are triton.testing.do_bench medians (p20/p80 too); decode forward (M <= 64) is timed
through CUDA graphs to take launch gaps out. Each row (with TFLOP/s, GB/s from the analytic
byte count, and the provider's max abs error against the fp32 reference) is appended to
bench/results/op_gpu.csv with the GPU name and date, and printed, as soon as it is timed; a
provider that fails to build, run or check becomes a row with its error and the run goes on.
bench/results/op_gpu.png is drawn from the CSV. Needs a CUDA GPU: without one it says so and
exits with status 2.
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
from providers import Problem, build_providers, flops, make_problem  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.kernels import reference  # noqa: E402

PREFILL = [(m, k, n, 16) for m in (2048, 8192)
           for (k, n) in ((4096, 4096), (4096, 11008), (11008, 4096))]
DECODE = [(m, k, n, 16) for m in (1, 16, 64) for (k, n) in ((4096, 4096), (4096, 11008))]
PROVIDERS = ["base", "unfused", "peft", "two_gemm", "fused_pertile", "fused"]
DRY_RUN_SHAPES = [(64, 64, 96, 8), (3, 64, 96, 8)]
MODES = ["forward", "backward", "fwd+bwd"]
CSV_PATH = common.RESULTS_DIR / "op_gpu.csv"
FIELDS = common.CSV_FIELDS + ["gbps", "max_abs_err", "error"]
ROW_ECHO = ["M", "K", "N", "mode", "provider", "median_ms", "ratio_to_base", "max_abs_err",
            "error"]


def bytes_moved(m, k, n, r, mode, provider) -> float:
    """Fewest bytes of one call in bf16: each input read once, each output written once."""
    e = 2
    fwd = e * (m * k + n * k + m * n) + (0 if provider == "base" else e * 2 * r * (k + n))
    lora_bwd = 0 if provider == "base" else e * (2 * 2 * r * (k + n) + m * k)
    bwd = e * (m * n + n * k + m * k) + lora_bwd
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


def max_abs_errors(p: Problem, providers: list[str]) -> dict[str, str]:
    """Forward max abs error of each provider against the fp32 reference of the same inputs
    (a provider that fails gets its error's text instead)."""
    r = p.a[0].shape[0]
    scale = torch.cat([(p.scaling * m).expand(-1, r) for m in p.mix], dim=1).contiguous()
    a_st, b_st = torch.cat(p.a), torch.cat(p.b, dim=1)
    ref = reference.lora_linear(p.x.float(), p.weight.float(), p.bias.float(), a_st.float(),
                                b_st.float(), scale)
    base_ref = torch.nn.functional.linear(p.x.float(), p.weight.float(), p.bias.float())
    # peft has no per-row mix: both adapters at their full scaling.
    static_ref = reference.lora_linear(p.x.float(), p.weight.float(), p.bias.float(),
                                       a_st.float(), b_st.float(),
                                       torch.full_like(scale[:1], p.scaling))
    refs = {"base": base_ref, "peft": static_ref}
    out = {}
    with torch.no_grad():
        for name in providers:
            try:
                fn = build_providers(p, "forward", [name], return_output=True,
                                     fused_backend=fused_backend(p.x))[name]
                out[name] = f"{(fn().float() - refs.get(name, ref)).abs().max().item():.4g}"
            except Exception as err:  # noqa: BLE001 - reported in the row, the run goes on
                out[name] = f"failed: {_one_line(err)}"
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:240]


def fused_backend(x):
    """The dry run (CPU tensors) runs the fused op on the Triton kernels in the interpreter."""
    return "triton" if x.device.type == "cpu" else None


def time_provider(fn, mode, m, dry_run=False) -> list[float]:
    """(median, p20, p80) in ms through do_bench; CUDA graphs for decode forward. The dry run
    times 3 calls with the wall clock (no GPU: the figures only prove the path runs)."""
    if dry_run:
        import time
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return [times[1], times[0], times[2]]
    import triton.testing as tt

    if mode == "forward" and m <= 64:
        med = tt.do_bench_cudagraph(fn, rep=200, return_mode="median")
        p20, p80 = (tt.do_bench_cudagraph(fn, rep=200, quantiles=[0.2, 0.8]) or [med, med])
        return [med, p20, p80]
    med, p20, p80 = tt.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
    return [med, p20, p80]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one prefill and one decode shape")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="MxKxN",
                    help="shapes to run (r = 16 per branch), default the full list")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    ap.add_argument("--dropout-shapes", nargs="*", default=[], metavar="MxKxN",
                    help="also the LoRA dropout rows at these shapes (fwd+bwd, with saved MB)")
    ap.add_argument("--dropout", type=float, default=0.05, help="p of the dropout rows")
    ap.add_argument("--csv", type=Path, default=CSV_PATH)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU + TRITON_INTERPRET=1, tiny shapes: tests the script, no GPU figures")
    return ap


def _device(dry_run: bool):
    """(device, dtype): the GPU in bf16, or the CPU under the interpreter for a dry run."""
    if dry_run:
        from feddpa_fast.kernels.triton_config import interpreting
        if not interpreting():
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 set before the script starts")
        from feddpa_fast.kernels import triton_op
        triton_op.serve_for_process("cpu")  # the op's CPU kernels are Triton's from here on
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        print("bench/op_gpu.py needs a CUDA GPU; none is visible.", file=sys.stderr)
        raise SystemExit(2)
    return torch.device("cuda"), torch.bfloat16


def _shapes(args) -> list[tuple]:
    if args.shapes:
        return [tuple(int(v) for v in s.split("x")) + (16,) for s in args.shapes]
    if args.dry_run:
        return DRY_RUN_SHAPES
    return [PREFILL[0], DECODE[1]] if args.quick else PREFILL + DECODE


def _shape_rows(shape, args, providers, meta, dtype, device) -> list[dict]:
    """Every mode's rows of one shape, providers timed one after another (base first, the
    ratios' denominator). Each row is appended to the CSV and printed as it completes; a
    provider that fails becomes a row with its error, and the run goes on."""
    m, k, n, r = shape
    problem = make_problem(m, k, n, r, dtype=dtype, device=device)
    errors = max_abs_errors(problem, providers)
    rows = []
    for mode in args.modes:
        base_median = None
        for name in providers:
            row = {**meta, "M": m, "K": k, "N": n, "r": r, "mode": mode, "provider": name}
            try:
                fn = build_providers(problem, mode, [name], backward_only=(mode == "backward"),
                                     fused_backend=fused_backend(problem.x))[name]
                med, p20, p80 = time_provider(fn, mode, m, args.dry_run)
            except Exception as err:  # noqa: BLE001 - one provider's failure is its row
                row["error"] = _one_line(err)
            else:
                base_median = med if name == "base" else base_median
                row.update(median_ms=f"{med:.5f}", p20_ms=f"{p20:.5f}", p80_ms=f"{p80:.5f}",
                           tflops=f"{flops(m, k, n, r, mode, name) / med / 1e9:.2f}",
                           gbps=f"{bytes_moved(m, k, n, r, mode, name) / med / 1e6:.1f}",
                           ratio_to_base=f"{med / base_median:.4f}" if base_median else "")
                err_text = errors.get(name, "")
                if mode == "forward" and err_text.startswith("failed"):
                    row["error"] = f"accuracy check {err_text}"
                elif mode == "forward":
                    row["max_abs_err"] = err_text
            common.append_rows(args.csv, [row], FIELDS)
            print("row " + ", ".join(f"{key}={row[key]}" for key in ROW_ECHO if row.get(key)),
                  flush=True)
            rows.append(row)
    return rows


def _dropout_rows(args, meta, dtype, device) -> None:
    drop_shapes = [tuple(int(v) for v in s.split("x")) + (16,) for s in args.dropout_shapes]
    drop_csv = args.csv.with_name("op_gpu_dropout.csv")

    def emit(row):
        common.append_rows(drop_csv, [row], op_dropout.FIELDS)
        print("row dropout " + ", ".join(f"{key}={row[key]}" for key in ROW_ECHO
                                         if row.get(key)), flush=True)

    drop_rows = op_dropout.rows(
        drop_shapes, args.dropout, meta,
        lambda fns, shape: {n: time_provider(f, "fwd+bwd", shape[0], args.dry_run)
                            for n, f in fns.items()},
        problem_kwargs={"dtype": dtype, "device": device},
        fused_backend=fused_backend(torch.empty(0, device=device)), on_row=emit)
    print(f"# LoRA dropout p = {args.dropout}, fwd+bwd")
    print(op_dropout.table(drop_rows))


def main(argv=None) -> list[dict]:
    args = _parser().parse_args(argv)
    providers = [p for p in PROVIDERS if p in args.providers]
    if "base" not in providers:
        providers.insert(0, "base")  # ratios are to base
    device, dtype = _device(args.dry_run)
    meta = {
        "run_id": common.new_run_id(), "date": common.today(),
        "device": "cpu (dry run)" if args.dry_run else common.device_name(device),
        "threads": "", "torch": torch.__version__, "feddpa_fast": feddpa_fast.__version__,
        "bench": "op_gpu", "dtype": str(dtype).replace("torch.", ""),
    }
    rows = [row for shape in _shapes(args)
            for row in _shape_rows(shape, args, providers, meta, dtype, device)]
    print(f"# {meta['device']}, torch {meta['torch']}, {meta['date']}, {meta['dtype']}")
    print(common.markdown_table(rows, providers))
    if args.dropout_shapes:
        _dropout_rows(args, meta, dtype, device)
    print("max abs error vs fp32 reference (forward): " + "; ".join(
        f"{r['M']},{r['K']},{r['N']} {r['provider']}={r.get('max_abs_err', 'failed')}"
        for r in rows if r["mode"] == "forward"))
    if not args.no_plot and not args.dry_run:
        print(f"plot: {plot.plot_latest_run(args.csv, args.csv.with_suffix('.png'))}")
    return rows


if __name__ == "__main__":
    main()
