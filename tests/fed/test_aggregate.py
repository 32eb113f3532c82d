"""Aggregation rules with exact expected values."""
import pytest
import torch

from feddpa_fast.fed.aggregate import aggregate, clip_updates, fedavg, median, trimmed_mean


def _u(*values):
    return [{"a": torch.tensor([v, -v]), "b": torch.tensor([[2 * v]])} for v in values]


def test_fedavg_weighted_by_examples_and_uniform():
    ups = _u(1.0, 2.0, 6.0)
    out = fedavg(ups, [1, 1, 2])  # (1 + 2 + 12) / 4
    assert torch.equal(out["a"], torch.tensor([3.75, -3.75]))
    assert torch.equal(out["b"], torch.tensor([[7.5]]))
    assert torch.equal(fedavg(ups)["a"], torch.tensor([3.0, -3.0]))
    assert aggregate("fedavg", ups[0], ups, [1, 1, 2])["a"].tolist() == [3.75, -3.75]
    assert aggregate("uniform", ups[0], ups, [1, 1, 2])["a"].tolist() == [3.0, -3.0]


def test_median_odd_and_even_counts():
    assert median(_u(5.0, 1.0, 3.0))["a"].tolist() == [3.0, -3.0]
    assert median(_u(5.0, 1.0, 3.0, 100.0))["b"].tolist() == [[8.0]]  # (3 + 5) / 2 * 2


def test_trimmed_mean_drops_each_end():
    ups = _u(1.0, 2.0, 3.0, 4.0, 1000.0)
    assert trimmed_mean(ups, 0.2)["a"].tolist() == [3.0, -3.0]  # drops 1 and 1000
    assert trimmed_mean(ups, 0.0)["a"].tolist() == [202.0, -202.0]
    assert trimmed_mean(ups, 0.1)["a"].tolist() == [202.0, -202.0]  # floor(0.5) = 0


def test_norm_clipping_scales_only_large_updates():
    glob = {"a": torch.zeros(2), "b": torch.zeros(1, 1)}
    small, big = {"a": torch.tensor([0.3, 0.4]), "b": torch.zeros(1, 1)}, \
        {"a": torch.tensor([30.0, 40.0]), "b": torch.zeros(1, 1)}
    clipped = clip_updates(glob, [small, big], 1.0)
    assert torch.allclose(clipped[0]["a"], small["a"])
    assert torch.allclose(clipped[1]["a"], torch.tensor([0.6, 0.8]))
    out = aggregate("uniform", glob, [small, big], [1, 1], clip_norm=1.0)
    assert torch.allclose(out["a"], torch.tensor([0.45, 0.6]))


def test_dtype_is_kept_and_bad_arguments_raise():
    ups = [{"a": torch.tensor([1.0], dtype=torch.bfloat16)}] * 2
    assert fedavg(ups)["a"].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError):
        fedavg(ups, [0, 0])
    with pytest.raises(ValueError):
        trimmed_mean(ups, 0.5)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate("mean", ups[0], ups, [1, 1])
    with pytest.raises(ValueError, match="different key sets"):
        fedavg([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
