"""An adapter source attached to ``DualLoRALinear`` (``set_source``, C2A's ``GeneratedAdapters``):
the layer's precedence (merged > source > stacked adapters), the mix on the source's one
branch, nesting and restoring, validation before anything changes, gradients into the source."""
import copy

import pytest
import torch
from torch import nn

from feddpa_fast import merge, mix, patch, unmerge
from feddpa_fast.config import ADAPTERS, DualLoRAConfig
from feddpa_fast.fed.algorithms.c2a_hypernetwork import GeneratedAdapters
from feddpa_fast.layers import dual_lora_layers

R, ALPHA, SCALING = 4, 8, 2.0   # the stacked adapters' rank, alpha and alpha / r
GEN_RANK = 3                    # the generated factors' rank (differs from R on purpose)
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _model():
    """(patched model with random non-zero adapters, unpatched copy of the same base)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).double()
    ref = copy.deepcopy(base)
    model = patch(base, DualLoRAConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=("0", "2")))
    with torch.no_grad():
        for _, layer in dual_lora_layers(model):
            for name in ADAPTERS:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, dtype=w.dtype))  # in place: keeps the stacking
    assert [n for n, _ in dual_lora_layers(model)] == ["0", "2"]
    return model, ref


def _factors(seed, dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("0", "2"):
        a = torch.randn(GEN_RANK, 8, generator=gen, dtype=dtype).requires_grad_(requires_grad)
        b = torch.randn(8, GEN_RANK, generator=gen, dtype=dtype).requires_grad_(requires_grad)
        out[name] = (a, b)
    return out


def _by_hand(ref, x, deltas):
    """The unpatched model's forward with ``h + sum s * B A h`` added at each patched layer;
    ``deltas``: {layer name: [(A, B, s), ...]}."""
    h = x
    for i, module in enumerate(ref):
        out = module(h)
        for a, b, s in deltas.get(str(i), []):
            out = out + s * (h @ a.T) @ b.T
        h = out
    return h


def _stacked(model, w_g=1.0, w_l=1.0):
    """The deltas of the model's own two adapters under the mix (w_g, w_l)."""
    return {name: [(layer.lora_A["global"].weight.detach(), layer.lora_B["global"].weight.detach(),
                    w_g * SCALING),
                   (layer.lora_A["local"].weight.detach(), layer.lora_B["local"].weight.detach(),
                    w_l * SCALING)]
            for name, layer in dual_lora_layers(model)}


def _generated(factors, scaling):
    return {name: [(a.detach(), b.detach(), scaling)] for name, (a, b) in factors.items()}


def _x():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def test_source_replaces_both_stacked_adapters():
    model, ref = _model()
    x = _x()
    stacked = _by_hand(ref, x, _stacked(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), stacked, **TOL)  # no source: both adapters at 1.0
        factors = _factors(1)
        with GeneratedAdapters(model, factors, 0.7) as source:
            for name, layer in dual_lora_layers(model):
                assert layer.source[0] is source and layer.source[1] == name
            out = model(x)
        expected = _by_hand(ref, x, _generated(factors, 0.7))
        torch.testing.assert_close(out, expected, **TOL)
        assert not torch.allclose(out, stacked, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(out, ref(x), rtol=1e-3, atol=1e-3)
        # Detached again: back to the stacked adapters.
        assert all(layer.source is None for _, layer in dual_lora_layers(model))
        torch.testing.assert_close(model(x), stacked, **TOL)


def test_merged_layers_ignore_the_source():
    model, ref = _model()
    x = _x()
    with torch.no_grad():
        stacked = _by_hand(ref, x, _stacked(model))
        merge(model, 1.0, 1.0)
        assert all(layer.merged for _, layer in dual_lora_layers(model))
        merged_out = model(x)
        # merge folds the delta in fp32 (layers.py delta_weight): close to the fp64 sum only.
        torch.testing.assert_close(merged_out, stacked, rtol=1e-4, atol=1e-4)
        plain = copy.deepcopy(ref)  # the base model holding the merged weights
        for name, layer in dual_lora_layers(model):
            plain[int(name)].weight.copy_(layer.base_layer.weight)
        assert torch.equal(merged_out, plain(x))
        with GeneratedAdapters(model, _factors(2), 5.0):
            with_source = model(x)
        # A merged layer is its base layer (the merged weight): the source plays no part.
        assert torch.equal(with_source, merged_out)
        unmerge(model)
        with GeneratedAdapters(model, _factors(2), 5.0):
            assert not torch.allclose(model(x), merged_out, rtol=1e-3, atol=1e-3)


def test_mix_weighs_the_source_and_refuses_two_weights():
    model, ref = _model()
    x = _x()
    factors = _factors(3)
    layers = dual_lora_layers(model)
    with torch.no_grad(), GeneratedAdapters(model, factors, 0.9) as source:
        full = model(x)
        with mix(model, 0.0, 0.0):
            off = model(x)
        assert torch.equal(off, ref(x))  # exactly the base model's output
        with mix(model, 0.5, 0.5):
            half = model(x)
        torch.testing.assert_close(half, _by_hand(ref, x, _generated(factors, 0.5 * 0.9)), **TOL)
        torch.testing.assert_close(full, _by_hand(ref, x, _generated(factors, 0.9)), **TOL)

        bad_mixes = [(1.0, 0.0), (0.25, 0.75),
                     (torch.full((5,), 0.5, dtype=torch.float64),
                      torch.full((5,), 0.5, dtype=torch.float64)),   # per-sequence, even equal
                     (torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64),
                      torch.tensor([0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64))]
        for global_w, local_w in bad_mixes:
            with pytest.raises(ValueError, match="one branch"):
                with mix(model, global_w, local_w):
                    model(x)
            # Restored after the raising block: the same source, the default mix.
            for name, layer in layers:
                assert layer.source[0] is source and layer.source[1] == name
                assert layer.mix_weights == (1.0, 1.0)
            assert torch.equal(model(x), full)
    with pytest.raises(ValueError, match="one branch"):  # a 0-d weight with a graph: a tensor
        w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        with GeneratedAdapters(model, factors, 0.9), mix(model, w, w):
            model(x)
    assert all(layer.source is None and layer.mix_weights == (1.0, 1.0) for _, layer in layers)


def test_generated_adapters_nest_and_restore():
    model, ref = _model()
    x = _x()
    outer_f, inner_f = _factors(4), _factors(5)
    outer_exp = _by_hand(ref, x, _generated(outer_f, 1.5))
    inner_exp = _by_hand(ref, x, _generated(inner_f, 0.3))
    layers = dual_lora_layers(model)
    with torch.no_grad():
        with GeneratedAdapters(model, outer_f, 1.5) as outer:
            torch.testing.assert_close(model(x), outer_exp, **TOL)
            with GeneratedAdapters(model, inner_f, 0.3) as inner:
                assert all(layer.source[0] is inner for _, layer in layers)
                torch.testing.assert_close(model(x), inner_exp, **TOL)
            assert all(layer.source == (outer, name) for name, layer in layers)
            torch.testing.assert_close(model(x), outer_exp, **TOL)
            # The same object entered twice (re-entrant) restores level by level.
            with outer:
                with pytest.raises(RuntimeError, match="boom"):
                    with GeneratedAdapters(model, inner_f, 0.3):
                        raise RuntimeError("boom")
                assert all(layer.source == (outer, name) for name, layer in layers)
            assert all(layer.source == (outer, name) for name, layer in layers)
        assert all(layer.source is None for _, layer in layers)
        torch.testing.assert_close(model(x), _by_hand(ref, x, _stacked(model)), **TOL)


def test_bad_factors_raise_before_any_layer_changes():
    model, _ = _model()
    layers = dual_lora_layers(model)
    good = _factors(6)
    bad_shapes = {
        "A of the wrong width": (good["0"][0][:, :5], good["0"][1]),
        "B of the wrong height": (good["0"][0], good["0"][1][:6]),
        "ranks of A and B differ": (good["0"][0], good["0"][1][:, :2]),
        "A not a matrix": (good["0"][0].reshape(-1), good["0"][1]),
    }
    with GeneratedAdapters(model, good, 1.0) as attached:
        for what, bad in bad_shapes.items():
            with pytest.raises(ValueError, match="layer '0'"):
                GeneratedAdapters(model, {**good, "0": bad}, 1.0)
            assert all(layer.source == (attached, name) for name, layer in layers), what
        with pytest.raises(ValueError, match="missing"):
            GeneratedAdapters(model, {"0": good["0"]}, 1.0)
        with pytest.raises(ValueError, match="unexpected"):
            GeneratedAdapters(model, {**good, "3": good["0"]}, 1.0)
        with pytest.raises(ValueError, match="finite"):
            GeneratedAdapters(model, good, float("nan"))
        assert all(layer.source == (attached, name) for name, layer in layers)
    assert all(layer.source is None for _, layer in layers)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_flow_into_the_source_factors(dtype):
    model, ref = _model()
    x = _x()
    factors = _factors(8, dtype=dtype, requires_grad=True)  # float32: cast to the fp64 model
    with GeneratedAdapters(model, factors, 0.6):
        loss = model(x).square().sum()
    loss.backward()
    # The same loss by hand, for the expected gradients.
    twin = {n: tuple(t.detach().double().requires_grad_(True) for t in ab)
            for n, ab in factors.items()}
    by_hand = _by_hand(ref, x, {n: [(a, b, 0.6)] for n, (a, b) in twin.items()}).square().sum()
    by_hand.backward()
    torch.testing.assert_close(loss.detach(), by_hand.detach(), **TOL)
    for name, (a, b) in factors.items():
        assert a.grad is not None and b.grad is not None, name
        assert a.grad.dtype == dtype and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
        tol = TOL if dtype is torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(a.grad.double(), twin[name][0].grad, **tol)
        torch.testing.assert_close(b.grad.double(), twin[name][1].grad, **tol)
    # The stacked adapters took no part in the forward: no gradient reaches them.
    for _, layer in dual_lora_layers(model):
        for name in ADAPTERS:
            assert layer.lora_A[name].weight.grad is None
            assert layer.lora_B[name].weight.grad is None
