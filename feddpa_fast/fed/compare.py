"""``feddpa-fast compare``: several methods on one configuration, one table.

Each method runs in ``<root>/<algo>``. With ``resume`` a finished method is not run again
(its results.json is read back, when its checkpoint says the run finished with this very
configuration) and an unfinished one continues; a method that shares the rounds of one already
finished here (FedDPA-F those of FedIT: ``Algorithm.shares_rounds_with``) starts from them
(fed/reuse.py). The untrained base model is scored too (``<root>/base``, fed/base_model.py), and
the paper's comparisons get paired bootstrap intervals (fed/bootstrap.py). The tables
(compare.md), the rows and intervals (compare.json) and a plot (compare.png) go to ``root``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..errors import FeddpaError
from .algorithms import get_algorithm
from .base_model import BASE, evaluate_base
from .bootstrap import example_scores, paired_interval
from .checkpoint import load_checkpoint
from .loading import data_digests
from .options import ConfigError
from .results import FIXED

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
    base, why = with_run_dtype(base, started[0] if started else None)
    if progress:
        print(f"base model dtype for every method: {base.dtype} ({why})", file=sys.stderr)
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
    rows.insert(0, _base_row(base, root, resume))
    intervals = paper_intervals(root, [BASE, *algos], base.task)
    notes += [f"{iv['comparison']} ({iv['metric']}): no interval, {iv['error']}"
              for iv in intervals if "error" in iv]
    intervals = [iv for iv in intervals if "error" not in iv]
    parts = [format_table(rows), interval_table(intervals)] + notes
    table = "\n\n".join(p for p in parts if p)
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.md").write_text(table + "\n")
    (root / "compare.json").write_text(json.dumps(
        {"methods": [{k: r.get(k) for k in _JSON_KEYS} for r in rows],
         "intervals": intervals}, indent=2) + "\n")
    plot_methods(rows, root / "compare.png")
    return table


def _base_row(cfg, root: Path, resume: bool) -> dict:
    """The base model's row (fed/base_model.py): evaluated once, kept on resume when it was
    evaluated under the same settings."""
    out = root / BASE
    if resume:
        try:
            results = json.loads((out / "results.json").read_text())
            if results.get("settings") == _base_settings(cfg):
                return results
        except (OSError, ValueError):
            pass
    results = {**evaluate_base(cfg, out), "settings": _base_settings(cfg)}
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    return results


def _base_settings(cfg) -> dict:
    """What the base model's scores depend on (the data's contents included)."""
    identity = cfg.identity()
    keys = ("model", "task", "data", "clients", "seed", "test_limit", "dirichlet_alpha",
            "num_beams", "max_new_tokens", "prompt_format", "dtype", "compile")
    return {**{k: identity[k] for k in keys}, "data_sha256": data_digests(cfg)}


# The paper's comparisons (a personalized method beats FedIT on P and local-only on TTP), made
# for FedDPA and for its successors FedALT and FedSA-LoRA; FedDPA-T against each successor on
# both metrics; and the budget rule's (FedIT learned: its TTP above the base model's):
# (run, baseline, metric). A baseline is scored with one fixed mix (FedDPA never is one).
_PERSONALIZED = ("feddpa-f", "feddpa-t", "fedalt", "fedsa")
_COMPARISONS = [(m, "fedit", "P") for m in _PERSONALIZED] + \
               [(m, "local", "TTP") for m in _PERSONALIZED] + \
               [("feddpa-t", rival, metric) for rival in ("fedalt", "fedsa")
                for metric in ("P", "TTP")] + \
               [("fedit", BASE, "TTP")]


def paper_intervals(root: Path, methods: list[str], kind: str) -> list[dict]:
    """Each comparison of ``_COMPARISONS`` whose two methods were run, for every weight
    assignment, with its paired bootstrap interval (fed/bootstrap.py).

    Args:
        root: the comparison's directory (``<root>/<method>/predictions.jsonl``).
        methods: the methods run there (the base model's directory name included).
        kind: the task kind (how an answer is scored).

    Returns:
        One dict per comparison: comparison, metric, difference / low / high (in [0, 1]
        units) and verdict; or comparison, metric and ``error`` when the two runs did not
        answer the same examples (e.g. a client a Flower evaluation could not reach).
    """
    scores = {m: example_scores(root / m, kind) for m in methods
              if (root / m / "predictions.jsonl").exists()}
    out = []
    for run, baseline, metric in _COMPARISONS:
        if run not in scores or baseline not in scores:
            continue
        reference = scores[baseline][FIXED]
        for key, by_client in scores[run].items():
            label = run if key == FIXED else f"{run} ({key} weights)"
            entry = {"comparison": f"{label} vs {baseline}", "metric": metric}
            try:
                iv = paired_interval(by_client, reference, metric)
            except ValueError as exc:
                out.append({**entry, "error": str(exc)})
                continue
            out.append({**entry, "difference": iv.difference, "low": iv.low, "high": iv.high,
                        "verdict": iv.verdict})
    return out


def interval_table(intervals: list[dict]) -> str:
    """The markdown table of ``paper_intervals``' entries (differences in ROUGE-L or accuracy
    points); "" when there are none."""
    if not intervals:
        return ""
    lines = ["| comparison | metric | difference (points) | 95% paired bootstrap interval | "
             "verdict |", "|---|---|---|---|---|"]
    for iv in intervals:
        lines.append(f"| {iv['comparison']} | {iv['metric']} | {100 * iv['difference']:+.2f} | "
                     f"[{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] | {iv['verdict']} |")
    return "\n".join(lines)


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
