"""Static GPU report: every Triton kernel of the project, at every config the dispatcher or the
autotuner can choose for the GPU benchmark's shapes (plus odd shapes), compiled ahead of time
for sm_80 (A100), sm_90a (H100, H200) and, where the installed Triton can, sm_100a. No GPU is
needed: kernels/triton_static.py compiles each real launch plan (the launchers' own argument
lists, tensors on the meta device) with Triton's own specialisation and reads the cubin.

    python bench/gpu_static.py                  full report (make gpu-static)
    python bench/gpu_static.py --gate           the bounded subset the CI test runs

Per kernel, config and target: registers, spill bytes and STL/LDL count, shared memory against
the arch limit, the matrix instruction (HGMMA / HMMA / tcgen05), TMA loads (UTMALDG), the
schedule's tensor-core work beyond the plain GEMM (extra_mma_frac, from the grid and tiles),
programs per launch against the target's SMs, and atomic adds per output element.
Rows go to bench/results/gpu_static.csv (replaced per Triton version); exit status 1 when the
gate fails: a spill, a shared-memory overflow, or an sm_90a prefill kernel without HGMMA. At
the odd (unaligned) shapes an autotune candidate that fails is marked "pruned": the
autotuner's prune compiles the same launch and drops it, so it can never be chosen there.
Must run without TRITON_INTERPRET (the kernels are compiled, not interpreted).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench/gpu_static.py compiles kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from feddpa_fast.kernels import (  # noqa: E402
    triton_backward,
    triton_decode,
    triton_dropout,
    triton_forward,
    triton_forward_pertile,
    triton_launch,
    triton_schedule,
    triton_split,
    triton_static,
)
from feddpa_fast.kernels.triton_config import (  # noqa: E402
    aligned,
    da_default,
    decode_candidates,
    decode_default,
    dy_default,
    fwd_candidates,
    fwd_default,
    gemm_default,
)
from feddpa_fast.kernels.triton_dropout import InOpDropout  # noqa: E402

CSV_PATH = common.RESULTS_DIR / "gpu_static.csv"
FIELDS = ["date", "triton", "target", "kernel", "case", "config", "source", "regs",
          "spill_bytes", "stl", "ldl", "smem_bytes", "smem_limit", "mma", "tma",
          "extra_mma_frac", "programs", "sms", "atomics_per_elem", "ok"]
BF16 = torch.bfloat16
R = 32  # the benchmark's two branches of rank 16, stacked
PREFILL = [(m, k, n, R) for m in (2048, 8192) for (k, n) in ((4096, 4096), (4096, 11008),
                                                              (11008, 4096))]
DECODE = [(m, 4096, n, R) for m in (1, 16, 64) for n in (4096, 11008)]
ODD_PREFILL = [(67, 1000, 1030, 8), (67, 1000, 1030, 48)]
ODD_DECODE = [(1, 1000, 1030, 8), (1, 1000, 1030, 48)]
TARGETS = ["sm_80", "sm_90a", "sm_100a"]


def meta(*shape, dtype=BF16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@dataclasses.dataclass
class Case:
    kernel: str
    case: str          # prefill / decode / odd, with the shape
    prefill: bool      # gate: HGMMA required on sm_90a
    config: str
    source: str        # dispatched / autotune / fixed
    launch: object
    extra_mma_frac: float
    atomics_per_elem: int


def op_tensors(m, k, n, r):
    return dict(x=meta(m, k), w=meta(n, k), bias=meta(n), a=meta(r, k), b=meta(n, r),
                scale=meta(m, r, dtype=torch.float32))


# In-op LoRA dropout at the authors' p: the mask is generated in the kernels (Philox), so these
# variants carry its register cost.
DROPOUT = InOpDropout(0.05, torch.empty(1, device="meta", dtype=torch.int64))


def forward_cases(m, k, n, r, label, target, configs, sms, alternatives=True,
                  gate=False) -> list[Case]:
    """The chunked forward (and with lora_input) and dx through the same kernel, at each
    config; the in-op dropout launches at the dispatched config (the split forward's masked
    shrink and its GEMM, dx = dy W and the masked expand); with ``alternatives`` also the
    per-tile schedule and the split's two launches (measured alternatives, never dispatched:
    only at the benchmark's shapes)."""
    t = op_tensors(m, k, n, r)
    # As tma_allowed decides at a launch: sm_90+ and 16-byte aligned rows (bf16 here).
    use_tma = target != "sm_80" and triton_launch.tma_rows_aligned(2, k)
    dx_tma = target != "sm_80" and triton_launch.tma_rows_aligned(2, k, n)
    cases = []
    for cfg, source in configs:
        # lora_input adds a third tile stream; the gate compiles it at the dispatched config.
        for lora_input in ((False, True) if source == "dispatched" or not gate else (False,)):
            y, u = meta(m, n), meta(m, r, dtype=torch.float32)
            launch = triton_forward.forward_plan(
                t["x"], t["w"], t["bias"], t["a"], t["b"], t["scale"], y, u,
                meta(m, k) if lora_input else None, use_tma=use_tma, cfg=cfg, sms=sms)
            sched = triton_schedule.forward_schedule(m, n, cfg.block_m, cfg.block_n,
                                                     cfg.block_r, sms, computes_u=True)
            name = "fwd_lora_input" if lora_input else "fwd"
            cases.append(Case(name, label, True, cfg.label(), source, launch,
                              sched.extra_mma_frac, 0))
        if gate and source != "dispatched":
            continue  # the gate sweeps the autotune configs of the forward only
        launch = triton_forward.dx_plan(meta(m, n), t["w"], t["a"], meta(m, r), meta(m, k),
                                        use_tma=dx_tma, cfg=cfg, sms=sms)
        cases.append(Case("dx", label, True, cfg.label(), source, launch, 0.0, 0))
        if source == "dispatched":
            cases += dropout_cases(m, k, n, r, label, target, cfg, dx_tma, sms)
    if not alternatives:
        return cases
    cfg, source = configs[0]
    pertile = triton_forward_pertile.plan(t["x"], t["w"], t["bias"], t["a"], t["b"],
                                          t["scale"], meta(m, n),
                                          meta(m, r, dtype=torch.float32), cfg)
    cases.append(Case("fwd_pertile", label, True, cfg.label(), "alternative", pertile,
                      triton_schedule.pertile_schedule(m, n, cfg.block_m, cfg.block_n,
                                                       cfg.block_r).extra_mma_frac, 0))
    shrink = triton_split.shrink_plan(t["x"], t["a"], t["scale"],
                                      meta(m, r, dtype=torch.float32), meta(m, r))
    cases.append(Case("split_shrink", label, True, "64x128 w4 s3", "alternative", shrink,
                      0.0, 0))
    expand = triton_forward.gemm_plan(t["x"], t["w"], t["bias"], t["b"], meta(m, r),
                                      meta(m, n), cfg=cfg, sms=sms)
    cases.append(Case("split_gemm", label, True, cfg.label(), "alternative", expand, 0.0, 0))
    return cases


def dropout_cases(m, k, n, r, label, target, cfg, dx_tma, sms) -> list[Case]:
    """The in-op dropout path's own launches: the masked shrink and the GEMM taking its us
    (the split forward), dx = dy W alone, and the masked expand dx += (gs A) ⊙ keep. The
    shrink and the expand are (M x K) x (K x R) products bound by memory, so the gate does not
    ask them for HGMMA (the shrink's 32-row tiles at unaligned shapes are below wgmma's 64)."""
    t = op_tensors(m, k, n, r)
    u, us = meta(m, r, dtype=torch.float32), meta(m, r)
    shrink = triton_split.shrink_plan(t["x"], t["a"], t["scale"], u, us, dropout=DROPOUT)
    gemm_cfg = gemm_default(target, n, r, aligned(k, n))
    gemm = triton_forward.gemm_plan(t["x"], t["w"], t["bias"], t["b"], us, meta(m, n),
                                    cfg=gemm_cfg, sms=sms)
    dx = triton_forward.dx_plan(meta(m, n), t["w"], t["a"], None, meta(m, k), use_tma=dx_tma,
                                cfg=cfg, sms=sms)
    expand = triton_dropout.masked_expand_plan(meta(m, k), us, t["a"], DROPOUT)
    shrink_tiles = f"{shrink.args['BLOCK_M']}x{shrink.args['BLOCK_K']} w4 s3"
    return [Case("dropout_shrink", label, False, shrink_tiles, "dispatched", shrink, 0.0, 0),
            Case("dropout_gemm", label, True, gemm_cfg.label(), "dispatched", gemm, 0.0, 0),
            Case("dx_dy_only", label, True, cfg.label(), "dispatched", dx, 0.0, 0),
            Case("dropout_expand", label, False, "64x64 w8 s2", "dispatched", expand, 0.0, 0)]


def backward_cases(m, k, n, r, label, target, sms) -> list[Case]:
    """The dy pass (g, dB) and the dA kernel at their fixed configs."""
    dy_cfg, da_cfg = dy_default(target, r, aligned(n)), da_default(target, r, aligned(k))
    g = meta(m, r, dtype=torch.float32)
    db32 = meta(n, r, dtype=torch.float32)
    dy = triton_backward.dy_plan(meta(m, n), meta(n, r), meta(m, r), g, db32, need_db=True,
                                 cfg=dy_cfg, sms=sms)
    dy_sched = triton_schedule.dy_schedule(m, n, dy_cfg.block_m, dy_cfg.block_cols, sms)
    da, da_dropout = (triton_backward.da_plan(meta(m, r), meta(m, k),
                                              meta(r, k, dtype=torch.float32), cfg=da_cfg,
                                              sms=sms, dropout=dropout)
                      for dropout in (None, DROPOUT))
    da_sched = triton_schedule.da_schedule(m, k, da_cfg.block_m, da_cfg.block_cols, sms)
    return [
        # dB: one atomic add per row block; g: one per slice of N (when sliced).
        Case("dy_pass", label, True, dy_cfg.label(), "fixed", dy, 0.0,
             max(dy_sched.row_blocks, dy_sched.chunks if dy_sched.chunks > 1 else 0)),
        Case("dA", label, True, da_cfg.label(), "fixed", da, 0.0, da_sched.chunks),
        Case("dA_dropout", label, True, da_cfg.label(), "fixed", da_dropout, 0.0,
             da_sched.chunks),
    ]


def decode_cases(m, k, n, r, label, target, configs, sms) -> list[Case]:
    t = op_tensors(m, k, n, r)
    cases = []
    for cfg, source in configs:
        launch = triton_decode.plan(t["x"], t["w"], t["bias"], t["a"], t["b"], t["scale"],
                                    None, meta(m, n), meta(m, r, dtype=torch.float32),
                                    cfg=cfg, sms=sms)
        sched = triton_schedule.decode_schedule(m, n, k, cfg.block_m, cfg.block_n,
                                                cfg.block_k, cfg.block_r, sms)
        cases.append(Case("decode", label, False, cfg.label(), source, launch,
                          sched.extra_mma_frac, 0))
    return cases


def build_cases(target: str, gate: bool) -> list[Case]:
    """Every (kernel, case, config) for ``target``; the gate keeps the dispatched configs at
    one prefill, one decode and the odd shapes, plus every autotune config at the big prefill."""
    sms = triton_schedule.SMS[target]
    cases = []
    prefill = PREFILL[3:4] if gate else PREFILL  # 8192 x 4096 -> 4096
    for (m, k, n, r) in prefill:
        dispatched = fwd_default(target, n, r)
        configs = [(dispatched, "dispatched")] + [
            (c, "autotune") for c in fwd_candidates(target, r) if c != dispatched]
        label = f"prefill M={m} K={k} N={n} R={r}"
        cases += forward_cases(m, k, n, r, label, target, configs, sms, gate=gate)
        cases += backward_cases(m, k, n, r, label, target, sms)
    for (m, k, n, r) in ODD_PREFILL:
        label = f"odd M={m} K={k} N={n} R={r}"
        cases += forward_cases(m, k, n, r, label, target,
                               [(fwd_default(target, n, r, aligned(k, n)), "dispatched")], sms,
                               alternatives=False)
        cases += backward_cases(m, k, n, r, label, target, sms)
    decode = DECODE[:1] if gate else DECODE
    for (m, k, n, r) in decode + ODD_DECODE:
        dispatched = decode_default(target, m, r, aligned(k, n))
        configs = [(dispatched, "dispatched")]
        if not gate:
            configs += [(c, "autotune") for c in decode_candidates(target, m, r)
                        if c != dispatched]
        kind = "odd" if (m, k, n, r) in ODD_DECODE else "decode"
        cases += decode_cases(m, k, n, r, f"{kind} M={m} K={k} N={n} R={r}", target,
                              configs, sms)
        if kind == "odd":  # dx at M = 1 runs the prefill kernel
            dx_cfg = fwd_default(target, k, r, aligned(k, n))
            dx = triton_forward.dx_plan(meta(m, n), meta(n, k), meta(r, k), meta(m, r),
                                        meta(m, k), use_tma=False, cfg=dx_cfg, sms=sms)
            cases.append(Case("dx", f"odd M={m} K={k} N={n} R={r}", False, dx_cfg.label(),
                              "dispatched", dx, 0.0, 0))
    return cases


def judge(row: dict, prefill: bool) -> str:
    """'ok', or why the gate fails this row."""
    problems = []
    if int(row["spill_bytes"]) or int(row["stl"]) or int(row["ldl"]):
        problems.append("spills")
    if int(row["smem_bytes"]) > int(row["smem_limit"]):
        problems.append("shared memory overflow")
    if prefill and row["target"] == "sm_90a" and row["mma"] != "HGMMA":
        problems.append(f"{row['mma']} instead of HGMMA")
    return "; ".join(problems) or "ok"


def run(targets, gate: bool, jobs: int = 2) -> list[dict]:
    """Rows of every target, one process per target (compiling is CPU-bound)."""
    supported = [t for t in targets if triton_static.target_supported(t)]
    for t in set(targets) - set(supported):
        print(f"# {t}: not supported by this Triton ({triton.__version__}), skipped")
    if jobs > 1 and len(supported) > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(supported))) as pool:
            parts = pool.starmap(run_target, [(t, gate) for t in supported])
    else:
        parts = [run_target(t, gate) for t in supported]
    return [row for part in parts for row in part]


def run_target(target: str, gate: bool) -> list[dict]:
    """Compiles every case of ``target`` (cases sharing a binary compile once)."""
    rows, reports = [], {}
    for c in build_cases(target, gate):
        key = triton_static.compile_key(c.launch, target)
        if key not in reports:
            reports[key] = triton_static.compile_report(c.launch, target)
        rep = reports[key]
        row = {
            "date": common.today(), "triton": triton.__version__, "target": target,
            "kernel": c.kernel, "case": c.case, "config": c.config, "source": c.source,
            "regs": rep.regs, "spill_bytes": rep.spill_bytes, "stl": rep.stl, "ldl": rep.ldl,
            "smem_bytes": rep.smem_bytes, "smem_limit": triton_schedule.SMEM_LIMIT[target],
            "mma": rep.mma, "tma": "yes" if rep.tma else "no",
            "extra_mma_frac": f"{c.extra_mma_frac:.4f}",
            "programs": _programs(c.launch.grid), "sms": triton_schedule.SMS[target],
            "atomics_per_elem": c.atomics_per_elem,
        }
        row["ok"] = judge(row, c.prefill)
        if row["ok"] != "ok" and c.source == "autotune" and c.case.startswith("odd"):
            # Unaligned shapes: the autotuner's prune (the same compile) drops this config,
            # so it is not one the autotuner can choose.
            row["ok"] = f"pruned ({row['ok']})"
        rows.append(row)
    return rows


def _programs(grid) -> int:
    total = 1
    for g in grid:
        total *= g
    return total


def write_csv(path: Path, rows: list[dict]) -> None:
    """Replaces this Triton version's rows, keeps the other versions' (3.6 vs 3.9 side by side)."""
    versions = {r["triton"] for r in rows}
    kept = []
    if path.exists():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r.get("triton") not in versions]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(kept + rows)
    os.replace(tmp, path)


def markdown(rows: list[dict]) -> str:
    """The dispatched configs at the big prefill and decode M = 1 (bench/tables.py renders
    bench/README.md from the CSV)."""
    head = ("| triton | target | kernel | case | config | regs | spill B | smem KB (limit) | "
            "mma | TMA | extra MMA | programs / SMs |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        if r["source"] not in ("dispatched", "fixed", "alternative"):
            continue
        if not (r["case"].startswith("prefill M=8192 K=4096 N=4096") or
                r["case"].startswith("decode M=1 K=4096 N=4096")):
            continue
        out.append(f"| {r['triton']} | {r['target']} | {r['kernel']} | {r['case']} | "
                   f"{r['config']} | {r['regs']} | {r['spill_bytes']} | "
                   f"{int(r['smem_bytes']) / 1024:.0f} ({int(r['smem_limit']) / 1024:.0f}) | "
                   f"{r['mma']} | {r['tma']} | {100 * float(r['extra_mma_frac']):.2f} % | "
                   f"{r['programs']} / {r['sms']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", action="store_true", help="the bounded CI subset (sm_80, sm_90a)")
    ap.add_argument("--targets", default=None, help="comma-separated, default all")
    ap.add_argument("--jobs", type=int, default=2, help="compiling processes (one per target)")
    ap.add_argument("--csv", type=Path, default=None,
                    help=f"default {CSV_PATH} (the gate writes no CSV unless given)")
    args = ap.parse_args(argv)
    targets = args.targets.split(",") if args.targets else (
        ["sm_80", "sm_90a"] if args.gate else TARGETS)
    start = time.time()
    rows = run(targets, args.gate, args.jobs)
    csv_path = args.csv or (None if args.gate else CSV_PATH)
    if csv_path:
        write_csv(csv_path, rows)
    print(markdown(rows))
    bad = [r for r in rows if r["ok"] != "ok" and not r["ok"].startswith("pruned")]
    for r in bad:
        print(f"GATE FAIL {r['target']} {r['kernel']} {r['case']} {r['config']}: {r['ok']}")
    print(f"# {len(rows)} rows, {len(bad)} failing, triton {triton.__version__}, "
          f"{time.time() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
