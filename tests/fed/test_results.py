"""One result record per client (fed/results.py): the same keys for a fixed mix and for
FedDPA's instance-wise weighting, and the run's means over them."""
import pytest

from feddpa_fast.fed.results import FIXED, client_record, summarise


def _scores(p, ttp):
    return {"P": p, "TTP": ttp, "per_set": {"a": p, "b": 2 * ttp - p}}


def test_fixed_and_dynamic_records_have_the_same_keys():
    fixed = client_record({FIXED: _scores(0.5, 0.4)}, FIXED, {"fusion": {"examples": 5}})
    dynamic = client_record({"authors": _scores(0.6, 0.5), "opposite": _scores(0.2, 0.3)},
                            "opposite", {})
    assert set(fixed) - {"fusion"} == set(dynamic) == {"P", "TTP", "per_set", "by_assignment"}
    assert fixed["by_assignment"] is None and fixed["fusion"] == {"examples": 5}
    assert dynamic["P"] == 0.2 and dynamic["by_assignment"]["authors"]["P"] == 0.6


def test_summarise_means_over_the_clients():
    records = {c: client_record({"authors": _scores(p, t), "opposite": _scores(t, p)},
                                "authors", {}) for c, (p, t) in
               {"x": (0.2, 0.4), "y": (0.6, 0.8)}.items()}
    summary = summarise(records)
    assert summary["P"] == pytest.approx(0.4) and summary["TTP"] == pytest.approx(0.6)
    assert summary["by_assignment"]["opposite"] == pytest.approx({"P": 0.6, "TTP": 0.4})
    fixed = summarise({"x": client_record({FIXED: _scores(0.1, 0.3)}, FIXED, {})})
    assert fixed == pytest.approx({"P": 0.1, "TTP": 0.3, "by_assignment": None})
