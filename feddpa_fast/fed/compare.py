"""``feddpa-fast compare``: several methods on one configuration, one table.

Each method runs in ``<root>/<algo>``. With ``resume`` a finished method is not run again
(its results.json is read back, when its checkpoint says the run finished with this very
configuration) and an unfinished one continues; a method that shares the rounds of one already
finished here (FedDPA-F those of FedIT: ``Algorithm.shares_rounds_with``) starts from them
(fed/reuse.py). The table (compare.md), its rows (compare.json) and a plot (compare.png) go to
``root``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..errors import FeddpaError
from .algorithms import get_algorithm
from .checkpoint import load_checkpoint
from .options import ConfigError

__all__ = ["compare", "finished_results"]

_JSON_KEYS = ("method", "P", "TTP", "bytes_per_client_round", "wall_s", "server_s", "rounds_s",
              "dtype", "wire_dtype", "dp", "reused_rounds_of")


def compare(base, algos: list[str], root: Path, *, resume: bool = False, progress: bool = True,
            on_result=None) -> str:
    """Runs (or resumes) every method of ``algos`` on ``base`` and writes the comparison.

    Args:
        base: the RunConfig every method shares (its ``algo`` and ``out`` are replaced).
        algos: method names, run in this order.
        root: the comparison's directory.
        resume: continue what exists, skip what finished, start what does not.
        progress: progress bars and per-round lines.
        on_result: called with each method's results dict as it finishes.

    Returns:
        The table (markdown), also written to ``root/compare.md``.

    Raises:
        ConfigError: ``--final-eval none`` (compare ranks by the final scores).
    """
    from .evaluate import format_table, plot_methods

    if base.final_eval == "none":
        raise ConfigError("--final-eval none: compare ranks the methods by their final scores; "
                          "use train for training-only runs")
    from .runner import with_run_dtype

    root = Path(root)
    # One base dtype for every method (their rounds are shared and compared): on resume, the
    # one the methods already run recorded.
    started = [root / a / "checkpoint.safetensors" for a in algos]
    started = [p for p in started if resume and p.exists()]
    base, _ = with_run_dtype(base, started[0] if started else None)
    rows, finished, notes = [], {}, []
    for algo in algos:
        cfg = dataclasses.replace(base, algo=algo, out=str(root / algo))
        results = run_compared(cfg, finished, resume=resume, progress=progress)
        if on_result is not None:
            on_result(results)
        finished[algo] = cfg.out
        rows.append(results)
        if results.get("reused_rounds_of"):
            notes.append(f"{algo} reuses {results['reused_rounds_of']}'s rounds (the same "
                         "rounds, bit for bit): its wall time is its own post step and "
                         "evaluation.")
        if results.get("by_assignment"):
            other = "opposite" if cfg.weighting.assignment == "authors" else "authors"
            v = results["by_assignment"][other]
            rows.append({**results, "method": f"{algo} ({other} weights)", "P": v["P"],
                         "TTP": v["TTP"]})
    table = "\n\n".join([format_table(rows)] + notes)
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.md").write_text(table + "\n")
    (root / "compare.json").write_text(
        json.dumps([{k: r.get(k) for k in _JSON_KEYS} for r in rows], indent=2) + "\n")
    plot_methods(rows, root / "compare.png")
    return table


def run_compared(cfg, finished: dict, *, resume: bool, progress: bool) -> dict:
    """One method of a compare; a method sharing the rounds of one already ``finished`` here
    starts from them (fed/reuse.py; results.json says so). The results carry the wall time
    this compare spent."""
    from .reuse import seed_from_rounds
    from .runner import run

    out = Path(cfg.out)
    started = (out / "checkpoint.safetensors").exists()
    done = finished_results(out, cfg) if resume and started else None
    if done is not None:
        return done  # a finished method is not run again
    start = time.perf_counter()
    source = get_algorithm(cfg).shares_rounds_with
    reused = source in finished and seed_from_rounds(finished[source], cfg)
    # resume continues what exists and starts what does not.
    results = run(cfg, resume=(resume and started) or reused, progress=progress)
    results["wall_s"] = time.perf_counter() - start if not started else results["wall_s"]
    return results


def finished_results(out: Path, cfg) -> dict | None:
    """The results.json of a finished run of ``cfg`` in ``out`` (None: not finished, another
    configuration's, or unreadable)."""
    try:
        results = json.loads((Path(out) / "results.json").read_text())
        _, state = load_checkpoint(Path(out) / "checkpoint.safetensors")
    except (OSError, ValueError, FeddpaError):
        return None
    finished = state.finished(cfg.rounds, get_algorithm(cfg).post_step)
    return results if finished and state.config == cfg.identity() else None
