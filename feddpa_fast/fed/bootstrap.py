"""Paired bootstrap intervals over test examples for the comparisons the paper makes
(docs/trainer.md, compare): a difference of P or TTP between two finished runs is reported with
a 95 % interval, so a "beats" is backed by more than the luck of which test examples were
drawn. It covers that source of noise only: not the training seed (one run per method), and
the several intervals of a comparison are not corrected for multiple comparisons.

Both runs answered the same test examples (the same data, seed and ``--test-limit``). One
bootstrap replicate draws, for every test set, its examples with replacement, the same draw for
every client that is scored on that set and for both runs (paired), and recomputes the
difference of the run-level metric exactly as the run computes it: P = the mean over clients of
the score on their own set, TTP = the mean over clients of the mean over every set. Scores per
example are those the run's task averages: ROUGE-L F (causal LM, rouge-score as
``CausalLMTask.score``) or exact match (classification).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .results import FIXED

__all__ = ["Interval", "example_scores", "paired_interval"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A difference ``a - b`` of a metric (in [0, 1] units) and its bootstrap interval."""

    difference: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """"beats" (the interval is above 0), "loses" (below 0) or "not separable"."""
        if self.low > 0:
            return "beats"
        return "loses" if self.high < 0 else "not separable"


def example_scores(run_dir, kind: str) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Per-example scores of a finished run, from its predictions.jsonl.

    Args:
        run_dir: a run directory (or the comparison's base-model directory).
        kind: the task kind, "causal-lm" (ROUGE-L F) or "classify" (exact match).

    Returns:
        {key: {client: {test set: scores in the set's order}}}, key = "fixed" for a method
        with one mix, each weight assignment for FedDPA's dynamic mix.

    Raises:
        FileNotFoundError: the run has no predictions.jsonl (``--final-eval none``).
    """
    path = Path(run_dir) / "predictions.jsonl"
    score = _scorer(kind)
    out: dict = {}
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            key = row.get("assignment", FIXED)
            sets = out.setdefault(key, {}).setdefault(row["client"], {})
            sets.setdefault(row["task"], []).append(score(row["reference"], row["answer"]))
    return {key: {c: {t: np.asarray(v, dtype=np.float64) for t, v in sets.items()}
                  for c, sets in clients.items()} for key, clients in out.items()}


def _scorer(kind: str):
    if kind == "classify":
        return lambda reference, answer: float(reference == answer)
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return lambda reference, answer: rouge.score(reference, answer)["rougeL"].fmeasure


def paired_interval(a: dict, b: dict, metric: str, *, reps: int = 2000, level: float = 0.95,
                    seed: int = 0) -> Interval:
    """The difference ``metric(a) - metric(b)`` and its paired percentile bootstrap interval.

    Args:
        a, b: {client: {test set: per-example scores}} of two runs (``example_scores[key]``),
            the same clients, sets and set sizes.
        metric: "P" (each client's own set, the set named after it) or "TTP" (every set).
        reps: bootstrap replicates.
        level: the interval's coverage.
        seed: the resampling seed (the interval is reproducible).

    Returns:
        ``Interval(difference, low, high)``: the observed difference and the interval's ends.

    Raises:
        ValueError: the runs did not answer the same examples, or an unknown metric.
    """
    if metric not in ("P", "TTP"):
        raise ValueError(f"metric must be 'P' or 'TTP', got {metric!r}")
    sizes = _same_examples(a, b)
    rng = np.random.default_rng(seed)
    draws = {t: rng.integers(0, n, size=(reps, n)) for t, n in sorted(sizes.items())}

    def replicated(run) -> np.ndarray:
        """(reps + 1,) run-level metric: the observed value, then each replicate's."""
        per_client = []
        for client, sets in run.items():
            names = [client] if metric == "P" else list(sets)
            means = [np.concatenate([[sets[t].mean()], sets[t][draws[t]].mean(axis=1)])
                     for t in names]
            per_client.append(np.mean(means, axis=0))
        return np.mean(per_client, axis=0)

    diff = replicated(a) - replicated(b)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diff[1:], [tail, 100 - tail])
    return Interval(float(diff[0]), float(low), float(high))


def _same_examples(a: dict, b: dict) -> dict[str, int]:
    """{test set: its size}, after checking both runs scored the same clients on the same
    sets of the same sizes (and every client has its own set)."""
    if sorted(a) != sorted(b):
        raise ValueError(f"the runs have different clients: {sorted(a)} and {sorted(b)}")
    sizes: dict[str, int] = {}
    for client in a:
        if client not in a[client]:
            raise ValueError(f"client {client!r} has no test set of its own in the predictions")
        for run in (a, b):
            if sorted(run[client]) != sorted(a[client]):
                raise ValueError(f"client {client!r} was scored on different test sets")
            for t, scores in run[client].items():
                if sizes.setdefault(t, len(scores)) != len(scores) or not len(scores):
                    raise ValueError(f"test set {t!r} has {len(scores)} scored examples in one "
                                     f"place and {sizes[t]} in another (or none)")
    return sizes
