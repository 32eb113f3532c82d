"""C2A hypernetwork (feddpa_fast.fed.algorithms.c2a_hypernetwork): shapes, init, size, gradients
through the fused op, the ``GeneratedAdapters`` adapter source, label distributions."""
import pytest
import torch
from torch import nn

import feddpa_fast
from feddpa_fast.fed.algorithms.c2a_hypernetwork import (
    AdapterHypernetwork,
    GeneratedAdapters,
    label_distribution,
    lora_parameter_count,
    uniform_label_distribution,
)
from feddpa_fast.fed.data import ClassifyExample
from feddpa_fast.layers import dual_lora_layers

MIXED = [("q", 16, 16), ("v", 16, 16), ("up", 16, 24), ("down", 24, 16), ("out", 16, 8)]


def _randomise_head_b(hyper, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hyper.head_b.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def _tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    cfg = feddpa_fast.DualLoRAConfig(r=2, alpha=2, dropout=0.0, target_modules="all-linear")
    return feddpa_fast.patch(model, cfg).double()


def _layer_shapes(model):
    return [(n, m.in_features, m.out_features) for n, m in dual_lora_layers(model)]


def test_shapes_zero_b_at_init_and_conditioning():
    torch.manual_seed(0)
    hyper = AdapterHypernetwork(MIXED, rank=4, num_labels=3, context_dim=10,
                                emb_dim=8, hidden=12, basis_dim=5)
    assert set(hyper.basis_a) == {"16x16", "16x24", "24x16", "16x8"}  # shared per shape
    dist, ctx = torch.tensor([0.5, 0.5, 0.0]), torch.randn(10)
    factors = hyper(dist, ctx)
    assert list(factors) == [n for n, _, _ in MIXED]
    for name, k, n in MIXED:
        a, b = factors[name]
        assert a.shape == (4, k) and b.shape == (n, 4) and a.dtype == torch.float32
        assert torch.equal(b, torch.zeros_like(b))
        # LoRA's scale for A: RMS of uniform(+-1/sqrt(K)) is 1/sqrt(3K) (loose bounds).
        rms = a.square().mean().sqrt().item()
        assert 0.3 / (3 * k) ** 0.5 < rms < 3.0 / (3 * k) ** 0.5
    _randomise_head_b(hyper)
    base = hyper(dist, ctx)
    for other in (hyper(torch.tensor([0.0, 0.2, 0.8]), ctx), hyper(dist, torch.randn(10))):
        for name, _, _ in MIXED:
            assert not torch.allclose(base[name][0], other[name][0])  # A moves too
            assert not torch.allclose(base[name][1], other[name][1])


def test_patched_model_starts_as_base_model():
    model = _tiny_model()
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = model(x)  # the patched LoRA adapters have B = 0 as well
    hyper = AdapterHypernetwork(_layer_shapes(model), rank=2, num_labels=3, context_dim=4).double()
    with GeneratedAdapters(model, hyper(uniform_label_distribution(2, 3), torch.randn(4)), 1.0):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


def test_fewer_parameters_than_one_lora_adapter():
    layers = [(f"layer.{i}", 384, 384) for i in range(12)]
    hyper = AdapterHypernetwork(layers, rank=8, num_labels=4, context_dim=384,
                                emb_dim=32, hidden=64, basis_dim=16)
    n_hyper = sum(p.numel() for p in hyper.parameters())
    n_lora = lora_parameter_count(layers, 8)
    print(f"C2A hypernetwork: {n_hyper} parameters; one rank-8 LoRA adapter: {n_lora}")
    e, h, d, r, L = 32, 64, 16, 8, 12  # the docstring's formula
    assert n_hyper == (5 * e + L * e + 385 * e + (e + 1) * h + (h + 1) * h + 2 * (h + 1) * r * d
                       + d * (384 + 384)) == 48064
    assert n_lora == 73728 and n_hyper < n_lora


def test_gradients_through_fused_op_match_finite_differences():
    model = _tiny_model()
    torch.manual_seed(1)
    hyper = AdapterHypernetwork(_layer_shapes(model), rank=2, num_labels=3, context_dim=4,
                                emb_dim=4, hidden=5, basis_dim=3).double()
    _randomise_head_b(hyper)
    x = torch.randn(3, 6, dtype=torch.float64)
    dist = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    ctx = torch.randn(4, dtype=torch.float64)
    names = [n for n, _ in hyper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in hyper.named_parameters())

    def loss(*flat):
        factors = torch.func.functional_call(hyper, dict(zip(names, flat)), (dist, ctx))
        with GeneratedAdapters(model, factors, 1.5):
            return model(x).square().sum()

    grads = torch.autograd.grad(loss(*params), params)
    assert all(g.abs().sum() > 0 for g in grads)  # every parameter gets a gradient
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert all(layer.source is None for _, layer in dual_lora_layers(model))


def _factors(layer):
    """What an attached source gives the layer."""
    source, name = layer.source
    return source.factors(name)


def test_generated_adapters_restores_and_validates():
    model = _tiny_model()
    hyper = AdapterHypernetwork(_layer_shapes(model), rank=2, num_labels=3, context_dim=4).double()
    f1 = hyper(torch.tensor([1.0, 0, 0]), torch.zeros(4))
    f2 = hyper(torch.tensor([0, 1.0, 0]), torch.ones(4))
    layers = dict(dual_lora_layers(model))
    with GeneratedAdapters(model, f1, 2.0):
        assert _factors(layers["0"])[0] is f1["0"][0] and _factors(layers["0"])[2] == 2.0
        with GeneratedAdapters(model, f2, 3.0):
            assert _factors(layers["2"])[1] is f2["2"][1] and _factors(layers["2"])[2] == 3.0
        assert _factors(layers["2"])[1] is f1["2"][1]
        with pytest.raises(RuntimeError, match="boom"):
            with GeneratedAdapters(model, f2, 3.0):
                raise RuntimeError("boom")
        assert _factors(layers["0"])[0] is f1["0"][0] and _factors(layers["0"])[2] == 2.0
    assert all(layer.source is None for layer in layers.values())
    with pytest.raises(ValueError, match="missing"):
        with GeneratedAdapters(model, {"0": f1["0"]}, 1.0):
            pass
    with pytest.raises(ValueError, match="unexpected"):
        with GeneratedAdapters(model, {**f1, "extra": f1["0"]}, 1.0):
            pass
    for bad in ((f1["0"][0][:, :5], f1["0"][1]), (f1["0"][0], f1["0"][1][:4]),
                (f1["0"][0], f1["0"][1][:, :1])):
        with pytest.raises(ValueError, match="layer '0'"):
            with GeneratedAdapters(model, {**f1, "0": bad}, 1.0):
                pass
    assert all(layer.source is None for layer in layers.values())


def test_label_distributions():
    choices = ("neg", "neu", "pos")
    exs = [ClassifyExample(f"t{i}", lab, choices, "sst") for i, lab in
           enumerate(["pos", "pos", "neg", "pos"])]
    torch.testing.assert_close(label_distribution(exs, 4), torch.tensor([0.25, 0.0, 0.75, 0.0]))
    assert label_distribution(exs, 3).dtype == torch.float32
    with pytest.raises(ValueError, match="num_labels"):
        label_distribution(exs, 2)
    with pytest.raises(ValueError, match="choices"):
        label_distribution(exs + [ClassifyExample("t", "a", ("a", "b"), "x")], 4)
    with pytest.raises(ValueError):
        label_distribution([], 4)
    torch.testing.assert_close(uniform_label_distribution(2, 4), torch.tensor([0.5, 0.5, 0, 0]))
    torch.testing.assert_close(uniform_label_distribution(3, 3), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError):
        uniform_label_distribution(5, 4)
