"""FedALT's router overhead: its train step against FedDPA-T's local-phase step, in one process,
on the same model, client, batch and shapes.

* ``feddpa-t-local``: FedDPA-T's local phase as the trainer runs it (``FedDPAT.train_target``):
  the local adapter trains with the received global mixed in and frozen, float weights
  (0.5, 0.5), so the op's scale is one (1, R) row.
* ``fedalt``: FedALT's phase (``FedALT.train_target``): the same local adapter trains, the
  global slot holds the Rest-of-World adapter, and each layer's router gives every token its
  two weights: a per-row (M, R) scale that requires grad, so the op also computes
  ``d scale = g * u`` and autograd carries it into the routers.

A step is the forward and backward of one batch and an AdamW step of the phase's parameters,
exactly as ``fed/training.py`` takes it. The two alternate (bench/common.py) after warm-up.

    python bench/router_step.py [--data DIR] [--model smollm2|DIR] [--batch 8] [--reps 9]
                                [--dtype fp32|bf16|fp16] [--out CSV]

Rows go to bench/results/router_step_cpu.csv (median, p20, p80 ms; ``x_feddpa``: the step's
time over FedDPA-T's). The target (issue 28): fedalt <= 1.10 x feddpa-t-local.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import feddpa_fast  # noqa: E402
from feddpa_fast.precision import BASE_DTYPES  # noqa: E402

FIELDS = ["run_id", "date", "device", "threads", "torch", "transformers", "feddpa_fast",
          "bench", "model", "dtype", "batch", "tokens", "provider", "median_ms", "p20_ms",
          "p80_ms", "x_feddpa"]
BASELINE = "feddpa-t-local"


def _step(client, target, batch):
    """One training step of ``target`` (a TrainTarget) on ``batch``, as fed/training.py
    takes it."""
    opt = torch.optim.AdamW(target.params, lr=1e-4, weight_decay=0.0)

    def step():
        for module in target.modules:
            module.train()
        client.task.model.train()
        with target.batch_context():
            loss = client.task.loss(batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--dtype", default="fp32", choices=tuple(BASE_DTYPES))
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "router_step_cpu.csv")
    args = parser.parse_args(argv)

    from feddpa_fast.fed.algorithms import get_algorithm
    from feddpa_fast.fed.algorithms.base import Phase
    from feddpa_fast.fed.run_config import RunConfig
    from feddpa_fast.fed.runner import build_run

    data = common.lexical_suite(args.data)
    cfg = RunConfig(algo="fedalt", model=args.model, task="causal-lm", data=str(data),
                    clients=1, batch_size=args.batch, dtype=args.dtype,
                    out=tempfile.mkdtemp(prefix="router-step-"))
    run = build_run(cfg)  # FedALT joined: the model's routers exist
    client = next(iter(run.clients.values()))
    client.load_local(None)
    feddpa_t = get_algorithm(dataclasses.replace(cfg, algo="feddpa-t"))
    batch = client.fit[: args.batch]
    steps = {
        BASELINE: _step(client, feddpa_t.train_target(client, Phase("local", "local",
                                                                     (0.5, 0.5))), batch),
        "fedalt": _step(client, run.algorithm.train_target(client, run.algorithm.phases(0)[0]),
                        batch),
    }
    tokens = int(client.task._training_batch(batch)[1].sum())
    samples = common.time_alternating(steps, args.reps, warmup=2)
    base_median = common.quantiles(samples[BASELINE])[0]
    run_id, device = common.new_run_id(), common.device_name(torch.device("cpu"))
    import transformers

    rows = []
    for provider, times in samples.items():
        median, p20, p80 = common.quantiles(times)
        rows.append({"run_id": run_id, "date": common.today(), "device": device,
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "feddpa_fast": feddpa_fast.__version__, "bench": "router_step",
                     "model": args.model if args.model == "smollm2" else "custom",
                     "dtype": args.dtype, "batch": args.batch,
                     "tokens": tokens, "provider": provider, "median_ms": f"{median:.1f}",
                     "p20_ms": f"{p20:.1f}", "p80_ms": f"{p80:.1f}",
                     "x_feddpa": f"{median / base_median:.3f}"})
    common.append_rows(args.out, rows, FIELDS)
    print(f"| provider | median ms | p20 | p80 | x {BASELINE} |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['provider']} | {row['median_ms']} | {row['p20_ms']} | {row['p80_ms']} "
              f"| {row['x_feddpa']} |")
    print(f"({device}, {args.model} {args.dtype}, batch {args.batch}, {tokens} tokens, "
          f"{args.reps} reps; rows appended to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
