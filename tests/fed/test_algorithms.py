"""Algorithms as phases, and FedDPA's instance-wise dynamic weighting."""
import pytest
import torch
from tiny_models import randomize_lora_b

from feddpa_fast.fed.algorithms import ALGORITHMS, Algorithm, get_algorithm
from feddpa_fast.fed.algorithms.feddpa_weighting import (
    WeightingConfig,
    instance_weights,
    similarity_scores,
)
from feddpa_fast.fed.data import builtin_suite
from feddpa_fast.fed.evaluate import score_set
from feddpa_fast.fed.loading import build_task
from feddpa_fast.fed.run_config import ConfigError, RunConfig


def _algo(name):
    return get_algorithm(RunConfig(algo=name))


def test_phases_follow_the_papers():
    assert [p.name for p in _algo("fedit").phases(3)] == ["global"]
    assert [(p.train, p.weights) for p in _algo("local").phases(0)] == [("local", (0, 1))]
    t = _algo("feddpa-t")
    assert [p.train for p in t.phases(0)] == ["global"]  # round 0: global phase only
    local, glob = t.phases(1)
    assert (local.train, local.weights) == ("local", (0.5, 0.5))  # global mixed in, frozen
    assert (glob.train, glob.weights) == ("global", (1.0, 0.0))
    assert _algo("feddpa-f").post_step == "finetune" and ALGORITHMS["fedit"].post_step is None
    assert not ALGORITHMS["local"].uploads and ALGORITHMS["feddpa-t"].uploads
    with pytest.raises(ConfigError, match="--algo"):
        RunConfig(algo="fedprox")


def test_every_method_is_one_registered_algorithm_class():
    """The registry maps each name to its own Algorithm subclass; the protocol's hooks exist
    on each, and no method needs another module to say what it does."""
    assert set(ALGORITHMS) == {"fedit", "local", "feddpa-f", "feddpa-t", "fdlora", "c2a",
                               "fedalt", "fedsa"}
    for name, cls in ALGORITHMS.items():
        assert issubclass(cls, Algorithm) and cls.name == name
        algo = cls(RunConfig(algo=name))
        assert algo.phases(0) and algo.phases(1)
        assert callable(algo.final_evaluation) and callable(algo.upload)
    assert [a for a, c in ALGORITHMS.items() if c.post_step] == ["feddpa-f", "fdlora"]
    overridden = [a for a, c in ALGORITHMS.items() if c.setup is not Algorithm.setup]
    assert overridden == ["c2a"]  # the only method with a setup exchange before round 0
    # the only methods whose server is not "one global adapter, aggregated by the rule"
    own_server = [a for a, c in ALGORITHMS.items() if c.message is not Algorithm.message]
    assert own_server == ["fedalt"]


def test_similarity_scores_and_options():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reps = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    mean = similarity_scores(reps, anchors, WeightingConfig())
    assert torch.allclose(mean, torch.tensor([0.5, 0.0, 2 ** -0.5], dtype=torch.float64))
    top = similarity_scores(reps, anchors, WeightingConfig(reduction="max"))
    assert torch.allclose(top, torch.tensor([1.0, 0.0, 2 ** -0.5], dtype=torch.float64))
    l2 = similarity_scores(reps[:1], anchors[:1], WeightingConfig(similarity="l2"))
    assert l2.item() == 1.0  # distance 0
    with pytest.raises(ValueError):
        WeightingConfig(similarity="dot")


@pytest.fixture(scope="module")
def task(bert_dir):
    t = build_task(RunConfig(model=str(bert_dir), r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    randomize_lora_b(t.model, std=0.5)  # the two adapters differ
    return t


@pytest.mark.parametrize("assignment", ["authors", "opposite"])
def test_batched_dynamic_weights_equal_those_computed_one_by_one(task, assignment):
    train, test = builtin_suite(0)
    examples, anchors = test["topic"][:12], train["topic"][:5]
    cfg = WeightingConfig(assignment=assignment)
    g, lw = instance_weights(task, examples, anchors, cfg, batch_size=5)
    assert g.shape == lw.shape == (12,)
    assert torch.allclose(g + lw, torch.ones(12)) and (g != g[0]).any()
    capped = g if assignment == "authors" else lw
    assert (capped >= 0).all() and (capped <= 0.5).all()
    for i, e in enumerate(examples):
        gi, li = instance_weights(task, [e], anchors, cfg)
        torch.testing.assert_close(gi[0], g[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(li[0], lw[i], rtol=1e-5, atol=1e-6)
    # One batched forward with per-sequence weights predicts what per-example forwards do.
    batched = [task.predict(examples[i:i + 4], g[i:i + 4], lw[i:i + 4]) for i in range(0, 12, 4)]
    alone = [task.predict([e], float(g[i]), float(lw[i]))[0] for i, e in enumerate(examples)]
    assert sum(batched, []) == alone


def test_score_set_computes_both_assignments_from_one_set_of_weights(task):
    train, test = builtin_suite(0)
    scores = score_set(task, test["urgency"][:10], "dynamic", anchors=train["urgency"][:5],
                       weighting=WeightingConfig(), assignments=("authors", "opposite"))
    assert set(scores) == {"authors", "opposite"}
    assert all(0 <= v <= 1 for v in scores.values())
    fixed = score_set(task, test["urgency"][:10], "global")
    assert set(fixed) == {"fixed"}
