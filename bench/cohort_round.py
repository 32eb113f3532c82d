"""Cohort training against one client at a time: whole in-process rounds of the trainer on
SmolLM2, in one process (fed/cohort.py, docs/trainer.md "Cohorts").

* ``sequential``: ``--cohort-size 1``, each sampled client's local steps on its own.
* ``cohort``: the default cohort (every sampled client, at most 64 sequences per pass): step s
  of all clients in one batched pass over the client bank.

Both sides are ``Run``s of the same config but the cohort size (same model, data, clients,
seeds and batches); the rounds alternate (bench/common.py) after one warm-up round each, so a
FedDPA-T timed round has both of its phases (local, then global). Per side: the round's wall
time, the training tokens per second (the real, unpadded tokens of the round's batches over the
median round time), the cohort's padding fraction, and with ``--memory`` the peak resident
memory a round adds (each side alone in a child process, sampled every 5 ms, minus the
resident size before the round).

    python bench/cohort_round.py [--data DIR] [--model smollm2|DIR] [--algos fedit,feddpa-t]
                           [--clients 8] [--steps 4] [--batch 8] [--reps 3]
                           [--dtype fp32|bf16] [--memory] [--out CSV]

Rows go to bench/results/cohort_cpu.csv (``round_s`` median, p20, p80; ``x_cohort``: the side's
median over the cohort's, so the sequential row reads as the cohort's speed-up).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.precision import BASE_DTYPES  # noqa: E402

FIELDS = ["run_id", "date", "device", "threads", "torch", "transformers", "feddpa_fast",
          "bench", "model", "dtype", "algo", "clients", "steps", "batch", "provider",
          "cohort_size", "median_s", "p20_s", "p80_s", "tokens_per_s", "padding",
          "peak_rss_mb", "x_cohort"]
SIDES = {"sequential": 1, "cohort": None}  # --cohort-size of each side (None: the default)


def build_side(args, algo: str, cohort_size, data: Path, workdir: Path):
    """(one_round callable, stats) of a trainer Run at ``cohort_size``; stats counts the real
    tokens and padding of every training batch."""
    from feddpa_fast.fed.in_process import InProcess
    from feddpa_fast.fed.run_config import RunConfig
    from feddpa_fast.fed.runner import build_run

    cfg = RunConfig(algo=algo, model=args.model, task="causal-lm", data=str(data),
                    clients=args.clients, rounds=1000, max_steps=args.steps,
                    batch_size=args.batch, eval_every=0, final_eval="none",
                    dtype=args.dtype, cohort_size=cohort_size,
                    out=str(workdir / f"{algo}-{cohort_size}"))
    run = build_run(cfg)
    run.out.mkdir(parents=True, exist_ok=True)
    transport = InProcess(run, progress=False)
    stats = {"tokens": 0, "positions": 0}
    real_batch = run.task._training_batch

    def counted(examples):  # what the loss (one client, or a cohort's pass) trains on
        ids, mask, labels, keep = real_batch(examples)
        stats["tokens"] += int(mask.sum())
        stats["positions"] += mask.numel()
        return ids, mask, labels, keep

    run.task._training_batch = counted
    state = {"round": 0}

    def one_round():
        run._round(state["round"], transport)
        state["round"] += 1
    return one_round, stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 or a causal-LM directory (the tests' tiny Llama)")
    parser.add_argument("--algos", default="fedit,feddpa-t")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=list(BASE_DTYPES), default="fp32")
    parser.add_argument("--memory", action="store_true",
                        help="also the peak memory of a round, each side in a child process")
    parser.add_argument("--one-side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    data = common.lexical_suite(args.data)
    if args.one_side:
        return _one_side_memory(args, data)
    rows = []
    run_id = common.new_run_id()
    for algo in args.algos.split(","):
        with tempfile.TemporaryDirectory(prefix="cohort-") as tmp:
            sides = {name: build_side(args, algo, size, data, Path(tmp))
                     for name, size in SIDES.items()}
            for stats in (s for _, s in sides.values()):
                stats.update(tokens=0, positions=0)
            samples = common.time_alternating({n: f for n, (f, _) in sides.items()},
                                              args.reps, warmup=1)
            counts = {n: s for n, (_, s) in sides.items()}
        peaks = {n: _peak_rss_mb(args, algo, n) for n in SIDES} if args.memory else {}
        rows += _rows(args, run_id, algo, samples, counts, peaks)
    return _report(args, rows)


def _rows(args, run_id, algo, samples, counts, peaks) -> list[dict]:
    import transformers

    base = {"run_id": run_id, "date": common.today(),
            "device": common.device_name(torch.device("cpu")),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "feddpa_fast": feddpa_fast.__version__,
            "bench": "cohort", "model": args.model if args.model == "smollm2" else "custom",
            "dtype": args.dtype, "algo": algo, "clients": args.clients, "steps": args.steps,
            "batch": args.batch}
    cohort_median = common.quantiles(samples["cohort"])[0]
    rows = []
    for name, ms in samples.items():
        median, p20, p80 = (v / 1e3 for v in common.quantiles(ms))
        calls = len(ms) + 1  # timed rounds and the warm-up round
        tokens = counts[name]["tokens"] / calls
        padding = 1 - counts[name]["tokens"] / max(counts[name]["positions"], 1)
        rows.append({**base, "provider": name, "cohort_size": SIDES[name] or "default",
                     "median_s": f"{median:.2f}", "p20_s": f"{p20:.2f}", "p80_s": f"{p80:.2f}",
                     "tokens_per_s": f"{tokens / median:.0f}", "padding": f"{padding:.3f}",
                     "peak_rss_mb": f"{peaks[name]:.0f}" if name in peaks else "",
                     "x_cohort": f"{median * 1e3 / cohort_median:.3f}"})
    return rows


def _peak_rss_mb(args, algo: str, side: str) -> float:
    """The resident memory one round of ``side`` adds, measured in a child process."""
    cmd = [sys.executable, __file__, "--one-side", side, "--algos", algo, "--model",
           args.model, "--clients", str(args.clients), "--steps", str(args.steps),
           "--batch", str(args.batch), "--dtype", args.dtype]
    if args.data is not None:
        cmd += ["--data", str(args.data)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _one_side_memory(args, data: Path) -> int:
    """A child process: one round of one side; prints the most resident memory it added,
    sampled every 5 ms (ru_maxrss would also count loading the model)."""
    algo = args.algos.split(",")[0]
    with tempfile.TemporaryDirectory(prefix="cohort-mem-") as tmp:
        one_round, _ = build_side(args, algo, SIDES[args.one_side], data, Path(tmp))
        one_round()  # round 0 (FedDPA-T: the global phase only); the next has every phase
        before, peak, done = _rss_mb(), [0.0], threading.Event()

        def sample():
            while not done.wait(0.005):
                peak[0] = max(peak[0], _rss_mb())

        sampler = threading.Thread(target=sample)
        sampler.start()
        one_round()
        done.set()
        sampler.join()
    print(json.dumps({"peak_mb": max(peak[0] - before, 0.0)}))
    return 0


def _report(args, rows) -> int:
    out = args.out or common.RESULTS_DIR / "cohort_cpu.csv"
    common.append_rows(out, rows, FIELDS)
    print("| algo | side | round (s) median [p20, p80] | tokens/s | padding | peak MB | "
          "x cohort |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algo']} | {r['provider']} | {r['median_s']} [{r['p20_s']}, "
              f"{r['p80_s']}] | {r['tokens_per_s']} | {r['padding']} | {r['peak_rss_mb']} | "
              f"{r['x_cohort']} |")
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
