"""FDLoRA: the phases, the bounded fusion search, and the run end to end."""
import json
import math

import pytest

from feddpa_fast.fed.algorithms import get_algorithm
from feddpa_fast.fed.algorithms.fdlora_search import SearchConfig, fusion_search
from feddpa_fast.fed.run_config import RunConfig


def test_phases_personal_first_then_global_with_periodic_resync():
    a = get_algorithm(RunConfig(algo="fdlora"))
    assert [(p.name, p.train) for p in a.phases(0)] == [("personal", "local")]
    assert [p.name for p in a.phases(1)] == ["global"]
    resync = a.phases(a.sync_every)
    assert [p.name for p in resync] == ["resync", "global"] and resync[0].init_from_global


@pytest.mark.parametrize("budget", [3, 7, 16])
def test_search_respects_its_budget_and_beats_both_adapters_alone(budget):
    calls = []

    def loss(g, p):  # a smooth bowl with its minimum inside the box, off the anchors
        calls.append((g, p))
        return (g - 0.6) ** 2 + (p - 0.9) ** 2 + 0.1

    best, value, evaluations = fusion_search(loss, SearchConfig(budget=budget))
    assert len(calls) == len(evaluations) <= budget
    anchors = {w: v for w, v in evaluations[:3]}
    assert set(anchors) == {(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)}
    assert value <= anchors[(1.0, 0.0)] and value <= anchors[(0.0, 1.0)]
    assert all(0.0 <= w <= 1.5 for point, _ in evaluations for w in point)
    if budget >= 16:
        assert abs(best[0] - 0.6) < 0.15 and abs(best[1] - 0.9) < 0.15


def test_search_survives_non_finite_losses_and_rejects_bad_configs():
    best, value, _ = fusion_search(lambda g, p: float("nan") if g > 0.5 else p,
                                   SearchConfig(budget=6))
    assert math.isfinite(value) and value <= 1.0 and best[0] <= 0.5  # NaN points never win
    with pytest.raises(ValueError):
        SearchConfig(budget=2)


def test_fusion_weights_are_searched_on_the_holdout_and_recorded(bert_dir, tmp_path):
    from fed_fixtures import tiny_cfg

    from feddpa_fast.fed.runner import run

    results = run(tiny_cfg(bert_dir, tmp_path / "run", algo="fdlora", alpha=16.0),
                  progress=False)
    for name, per in results["per_client"].items():
        record = json.loads((tmp_path / "run" / "clients" / name / "fusion.json").read_text())
        assert per["fusion"] == record
        assert len(record["evaluations"]) <= record["budget"]
        losses = {tuple(e["weights"]): e["loss"] for e in record["evaluations"]}
        assert record["holdout_loss"] <= min(losses[(1.0, 0.0)], losses[(0.0, 1.0)])
        assert record["examples"] == 60  # 20 % of the 300 training sentences


def test_search_examples_caps_the_slice_the_search_scores(bert_dir, tmp_path):
    from feddpa_fast.fed.run_config import RunConfig
    from feddpa_fast.fed.runner import run

    cfg = RunConfig(algo="fdlora", model=str(bert_dir), clients=1, rounds=1,
                    max_steps=1, batch_size=8, test_limit=4, r=4, search_examples=5,
                    out=str(tmp_path / "run"))
    results = run(cfg, progress=False)
    record = next(iter(results["per_client"].values()))["fusion"]
    assert record["examples"] == 5
    assert cfg.identity()["search_examples"] == 5
    assert RunConfig().identity()["search_examples"] is None  # schema 2 records every option
