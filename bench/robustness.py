"""Robustness benchmark: one hostile client out of 8, four server rules, final P / TTP.

    python bench/robustness.py [--algo fedit|feddpa-t] [--rounds N] [--max-steps N]
                               [--test-limit N] [--attacks none,scale,signflip]
                               [--rules uniform,median,trimmed-mean,clip] [--clip-norm F]
                               [--model PATH|builtin] [--clients N] [--out DIR] [--csv PATH]

The embedded default (MiniLM + the built-in suite, 8 clients, 3 rounds, the demo's settings) is
run for every (attack, rule) pair. Attacks: ``none`` (clean), ``scale`` (the first client sends
global + 1000 x its update), ``signflip`` (global - update). Rules: ``uniform`` (plain FedAvg),
``median`` (coordinate-wise), ``trimmed-mean`` (trim 0.125: one of 8 dropped at each end) and
``clip`` (uniform FedAvg after clipping every update's L2 norm to ``--clip-norm``).

Clip bound: by default the median L2 norm of the honest clients' round-0 updates in the first
run of the grid. Round 0 starts from the same seeded global adapter whatever the rule, so an
honest client's round-0 update is the same in every run: the bound is "what a typical honest
client sends", measured, not tuned against the attack. Clipping at the median also shortens
about half the honest updates (by a little): the clean ``clip`` row shows that cost.

Each run writes under ``<out>/<attack>-<rule>/`` (replaced if present). Long-format rows go to
bench/results/robustness_cpu.csv; a markdown table (P / TTP over the honest clients, %) is printed.
"Honest" means = over all clients but the first (the hostile one), in the clean run too, so the
columns compare the same clients. For FedIT every client is scored with the one global adapter,
so TTP is the same for all clients and the honest / all means differ in P only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.fed.algorithms import base as fold_mod  # noqa: E402  (the default fold)
from feddpa_fast.fed.run_config import RunConfig  # noqa: E402
from feddpa_fast.fed.runner import run  # noqa: E402

ATTACKS = ("none", "scale", "signflip")
RULES = ("uniform", "median", "trimmed-mean", "clip")
COLUMN = {"none": "clean", "scale": "scale x1000", "signflip": "signflip"}
TRIM = 0.125  # floor(0.125 * 8) = 1: exactly the one hostile client's worth at each end
FIELDS = ["run_id", "date", "device", "torch", "feddpa_fast", "config", "attack", "rule",
          "clip_norm", "P_honest", "TTP_honest", "P_all", "TTP_all", "wall_s"]


class NormRecorder:
    """Wraps the default ``fold``'s ``aggregate`` (fed/algorithms/base.py) to record each
    round's update L2 norms (client - global, before any clipping). The runner keeps no
    record of what clients sent, and the clip bound must come from what honest clients
    actually send."""

    def __init__(self):
        self.rounds: list[list[float]] = []
        self._inner = fold_mod.aggregate

    def __call__(self, rule, global_adapter, updates, *args, **kwargs):
        self.rounds.append([
            float(torch.sqrt(sum(((u[k].double() - global_adapter[k].double()) ** 2).sum()
                                 for k in u))) for u in updates])
        return self._inner(rule, global_adapter, updates, *args, **kwargs)

    def __enter__(self):
        fold_mod.aggregate = self
        return self

    def __exit__(self, *exc):
        fold_mod.aggregate = self._inner


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", default="fedit", choices=["fedit", "feddpa-t"])
    p.add_argument("--model", default="builtin")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--test-limit", type=int, default=50)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--clip-norm", type=float, default=None,
                   help="fixed clip bound (default: measured, see the module docstring)")
    p.add_argument("--out", default="runs/robustness")
    p.add_argument("--csv", default=str(common.RESULTS_DIR / "robustness_cpu.csv"))
    args = p.parse_args(argv)
    args.attacks = args.attacks.split(",")
    # clip goes last so that the bound is measured before the first clip run needs it
    args.rules = sorted(args.rules.split(","), key=lambda r: r == "clip")
    bad = [a for a in args.attacks if a not in ATTACKS] + [r for r in args.rules if r not in RULES]
    if bad:
        p.error(f"unknown attack or rule: {bad}")
    if args.rules == ["clip"] and args.clip_norm is None:
        p.error("--rules clip alone needs --clip-norm (the bound is measured in a non-clip run)")
    return args


def scores(results: dict, cfg: RunConfig, hostile: set[str]) -> dict:
    """Mean P and TTP over the honest clients and over all clients."""
    per = results["per_client"]  # one record per client, the run's mix (fed/results.py)
    honest = [n for n in per if n not in hostile]
    mean = lambda names, m: sum(per[n][m] for n in names) / len(names)  # noqa: E731
    return {"P_honest": mean(honest, "P"), "TTP_honest": mean(honest, "TTP"),
            "P_all": mean(list(per), "P"), "TTP_all": mean(list(per), "TTP")}


def table(rows: list[dict], attacks: list[str], rules: list[str], clip_norm=None) -> str:
    """Rows: rule; columns: attack; cells: P / TTP (%) over the honest clients."""
    lines = ["| rule | " + " | ".join(f"{COLUMN[a]} P / TTP (%)" for a in attacks) + " |",
             "|---|" + "---|" * len(attacks)]
    for rule in rules:
        cells = []
        for a in attacks:
            r = next((x for x in rows if x["attack"] == a and x["rule"] == rule), None)
            cells.append(f"{100 * r['P_honest']:.2f} / {100 * r['TTP_honest']:.2f}" if r else "-")
        name = rule if rule != "clip" else f"clip (L2 <= {clip_norm:.4g})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    base = dict(algo=args.algo, model=args.model, clients=args.clients, rounds=args.rounds,
                max_steps=args.max_steps, test_limit=args.test_limit, trim=TRIM)
    config = (f"{args.algo} model={args.model} clients={args.clients} rounds={args.rounds} "
              f"max_steps={args.max_steps} test_limit={args.test_limit} trim={TRIM}")
    run_id, clip_norm, rows = common.new_run_id(), args.clip_norm, []
    device = common.device_name(torch.device("cpu"))  # the trainer runs on the CPU
    norms_log = {}
    for attack in args.attacks:
        for rule in args.rules:
            if rule == "clip" and clip_norm is None:
                raise RuntimeError("no clip bound measured yet")  # parse_args prevents this
            out = Path(args.out) / f"{attack}-{rule}"
            shutil.rmtree(out, ignore_errors=True)  # the runner refuses a dir with a checkpoint
            cfg = RunConfig(**base, out=str(out),
                            aggregation="uniform" if rule == "clip" else rule,
                            clip_norm=clip_norm if rule == "clip" else None,
                            hostile=None if attack == "none" else attack, hostile_clients=1)
            start = time.perf_counter()
            with NormRecorder() as rec:
                results = run(cfg, progress=False)
            wall = time.perf_counter() - start
            n_hostile = 0 if attack == "none" else cfg.hostile_clients
            # The runner makes the first client(s) in name order hostile; updates arrive in
            # that order too (full participation), so the first n_hostile norms are theirs.
            # "Honest" scores leave those clients out in the clean run as well, so that every
            # column of the table averages the same 7 clients.
            hostile = set(list(results["per_client"])[:cfg.hostile_clients])
            norms_log[f"{attack}-{rule}"] = rec.rounds
            if clip_norm is None:
                clip_norm = statistics.median(rec.rounds[0][n_hostile:])
                print(f"clip bound = median honest round-0 update norm = {clip_norm:.4g}",
                      file=sys.stderr)
            row = {"run_id": run_id, "date": common.today(), "device": device,
                   "torch": torch.__version__, "feddpa_fast": feddpa_fast.__version__,
                   "config": config, "attack": attack, "rule": rule,
                   "clip_norm": f"{clip_norm:.4g}" if rule == "clip" else "",
                   **{k: round(v, 6) for k, v in scores(results, cfg, hostile).items()},
                   "wall_s": round(wall, 1)}
            rows.append(row)
            print(f"{attack:8s} {rule:12s} P_honest {100 * row['P_honest']:6.2f} "
                  f"TTP_honest {100 * row['TTP_honest']:6.2f} P_all {100 * row['P_all']:6.2f} "
                  f"{wall:6.1f} s", file=sys.stderr)
    common.append_rows(Path(args.csv), rows, FIELDS)
    (Path(args.out) / "update_norms.json").write_text(json.dumps(norms_log, indent=1) + "\n")
    print(table(rows, args.attacks, args.rules, clip_norm))
    return rows


if __name__ == "__main__":
    main()
