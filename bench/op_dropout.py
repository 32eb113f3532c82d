"""The op benchmarks' LoRA dropout rows (bench/op_cpu.py, bench/op_gpu.py --dropout-shapes):
fwd+bwd of base, fused without dropout, fused_dropout (in-op), materialised_dropout (the
dropped copy materialised, torch ops) and peft_dropout, each with the bytes it saves for
backward."""
from __future__ import annotations

import sys

from providers import build_providers, make_problem, saved_bytes

PROVIDERS = ["base", "fused", "fused_dropout", "materialised_dropout", "peft_dropout"]
FIELDS = ["run_id", "date", "device", "threads", "torch", "feddpa_fast", "bench", "dtype", "M",
          "K", "N", "r", "dropout", "mode", "provider", "median_ms", "p20_ms", "p80_ms",
          "ratio_to_base", "saved_mb", "error"]


def rows(shapes, p: float, meta: dict, time_all, problem_kwargs=None, fused_backend=None,
         on_row=None):
    """One row per (shape, provider). ``time_all(fns, shape)`` -> {name: (median, p20, p80)}
    ms, shape = (M, K, N, r), all of a shape's providers in one call (alternated on the CPU).
    A provider that fails to build or run becomes a row with its error and the others are
    timed without it. ``on_row(row)`` is called as each row completes."""
    out = []
    for (m, k, n, r) in shapes:
        problem = make_problem(m, k, n, r, **(problem_kwargs or {}))
        fns, errors = {}, {}
        for name in PROVIDERS:
            try:
                fns.update(build_providers(problem, "fwd+bwd", [name], dropout=p,
                                           fused_backend=fused_backend))
                fns[name]()  # a provider that cannot run fails here, not inside the timing
            except Exception as err:  # noqa: BLE001 - one provider's failure is its row
                fns.pop(name, None)
                errors[name] = f"{type(err).__name__}: {' '.join(str(err).split())}"[:240]
        timed = time_all(fns, (m, k, n, r)) if fns else {}
        base_median = timed["base"][0] if "base" in timed else None
        for name in PROVIDERS:
            row = {**meta, "M": m, "K": k, "N": n, "r": r, "dropout": p, "mode": "fwd+bwd",
                   "provider": name}
            if name in errors:
                row["error"] = errors[name]
            else:
                med, p20, p80 = timed[name]
                saved = saved_bytes(problem, name, dropout=p, fused_backend=fused_backend)
                row.update(median_ms=f"{med:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                           ratio_to_base=f"{med / base_median:.4f}" if base_median else "",
                           saved_mb=f"{saved / 2**20:.3f}")
            out.append(row)
            if on_row:
                on_row(row)
        print(f"done dropout {m},{k},{n},{r}", file=sys.stderr, flush=True)
    return out


def table(rows: list[dict]) -> str:
    """One line per (shape, provider): ms, ratio to base, MB saved for backward."""
    out = ["| M, K, N, R | provider | fwd+bwd ms | x base | saved for backward (MB) |",
           "|---|---|---|---|---|"]
    for r in rows:
        if not r.get("median_ms"):
            out.append(f"| {r['M']}, {r['K']}, {r['N']}, {2 * int(r['r'])} | {r['provider']} | "
                       f"failed: {r.get('error', '')[:80]} | | |")
            continue
        out.append(f"| {r['M']}, {r['K']}, {r['N']}, {2 * int(r['r'])} | {r['provider']} | "
                   f"{float(r['median_ms']):.3f} | {float(r['ratio_to_base'] or 'nan'):.3f} | "
                   f"{float(r['saved_mb']):.2f} |")
    return "\n".join(out)
