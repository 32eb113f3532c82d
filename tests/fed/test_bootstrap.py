"""Paired bootstrap intervals (fed/bootstrap.py): the point difference is the runs' own metric
difference, the interval is paired and reproducible, and runs that did not answer the same
examples are refused."""
import json

import numpy as np
import pytest

from feddpa_fast.fed.bootstrap import Interval, example_scores, paired_interval

CLIENTS = ("alpha", "beta")


def _write_run(path, correct: dict, assignment=None):
    """A predictions.jsonl where ``correct[(client, set)]`` lists which answers are right."""
    path.mkdir(parents=True)
    rows = []
    for (client, task), flags in correct.items():
        for i, ok in enumerate(flags):
            row = {"client": client, "task": task, "prompt": f"p{i}", "reference": f"r{i}",
                   "answer": f"r{i}" if ok else "wrong", "weights": {"global": 1, "local": 0}}
            if assignment:
                row["assignment"] = assignment
            rows.append(json.dumps(row) + "\n")
    (path / "predictions.jsonl").write_text("".join(rows))
    return path


def _correct(rng, p_right: float, n: int = 40) -> dict:
    return {(c, t): list(rng.random(n) < p_right) for c in CLIENTS for t in CLIENTS}


def test_the_point_difference_is_the_runs_metric_difference(tmp_path):
    rng = np.random.default_rng(0)
    a_ok, b_ok = _correct(rng, 0.7), _correct(rng, 0.5)
    a = example_scores(_write_run(tmp_path / "a", a_ok, "authors"), "classify")["authors"]
    b = example_scores(_write_run(tmp_path / "b", b_ok), "classify")["fixed"]

    def metric(ok, m):
        per_client = [np.mean(ok[c, c]) if m == "P" else np.mean([np.mean(ok[c, t])
                                                                   for t in CLIENTS])
                      for c in CLIENTS]
        return np.mean(per_client)

    for m in ("P", "TTP"):
        iv = paired_interval(a, b, m, reps=500)
        assert iv.difference == pytest.approx(metric(a_ok, m) - metric(b_ok, m), abs=1e-12)
        assert iv.low <= iv.difference <= iv.high
        assert paired_interval(a, b, m, reps=500) == iv  # seeded: reproducible
        assert paired_interval(a, b, m, reps=500, seed=1) != iv


def test_pairing_a_run_with_itself_gives_zero_and_a_sure_win_beats(tmp_path):
    rng = np.random.default_rng(1)
    ok = _correct(rng, 0.6)
    run = example_scores(_write_run(tmp_path / "a", ok), "classify")["fixed"]
    same = paired_interval(run, run, "TTP", reps=300)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)
    assert same.verdict == "not separable"
    right = {k: [True] * len(v) for k, v in ok.items()}
    wrong = {k: [False] * len(v) for k, v in ok.items()}
    best = example_scores(_write_run(tmp_path / "r", right), "classify")["fixed"]
    worst = example_scores(_write_run(tmp_path / "w", wrong), "classify")["fixed"]
    assert paired_interval(best, worst, "P", reps=300).verdict == "beats"
    assert paired_interval(worst, best, "P", reps=300).verdict == "loses"


def test_the_interval_shrinks_with_more_examples(tmp_path):
    widths = []
    for n in (20, 320):
        rng = np.random.default_rng(2)
        a = example_scores(_write_run(tmp_path / f"a{n}", _correct(rng, 0.6, n)),
                           "classify")["fixed"]
        b = example_scores(_write_run(tmp_path / f"b{n}", _correct(rng, 0.5, n)),
                           "classify")["fixed"]
        iv = paired_interval(a, b, "TTP", reps=1000)
        widths.append(iv.high - iv.low)
    assert widths[1] < widths[0] / 2  # about 1 / sqrt(16) = 1/4 of the width


def test_rouge_scores_are_the_tasks_per_example_scores(tmp_path):
    (tmp_path / "r").mkdir()
    rows = [{"client": "alpha", "task": "alpha", "reference": "a small red house",
             "answer": "the red house"},
            {"client": "alpha", "task": "alpha", "reference": "cats", "answer": "cat"}]
    (tmp_path / "r" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                              for r in rows))
    scores = example_scores(tmp_path / "r", "causal-lm")["fixed"]["alpha"]["alpha"]
    assert scores[0] == pytest.approx(2 * (2 / 3 * 2 / 4) / (2 / 3 + 2 / 4))  # LCS 2 of 3, 4
    assert scores[1] == 1.0  # the stemmer: cat == cats


def test_runs_that_answered_different_examples_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    ok = _correct(rng, 0.5)
    a = example_scores(_write_run(tmp_path / "a", ok), "classify")["fixed"]
    fewer = {k: v[:-1] for k, v in ok.items()}
    b = example_scores(_write_run(tmp_path / "b", fewer), "classify")["fixed"]
    with pytest.raises(ValueError, match="scored examples"):
        paired_interval(a, b, "P")
    with pytest.raises(ValueError, match="different clients"):
        paired_interval(a, {"alpha": a["alpha"]}, "P")
    with pytest.raises(ValueError, match="'P' or 'TTP'"):
        paired_interval(a, a, "accuracy")
    with pytest.raises(FileNotFoundError):
        example_scores(tmp_path / "missing", "classify")
    assert Interval(0.1, -0.01, 0.2).verdict == "not separable"
