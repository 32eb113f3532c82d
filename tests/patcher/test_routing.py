"""Per-token routing (feddpa_fast.route, FedALT's mixer): the layer formula, every gradient
(the routers' included) through the fused op against autograd through an unfused reference,
the float mix weights on top, a skipped branch, saving and loading, and the refusals."""
import pytest
import torch
from tiny_models import batch, build, randomize_lora_b

import feddpa_fast as fd
from feddpa_fast.layers import dual_lora_layers


def _patched(kind="llama", dropout=0.0):
    model, _ = build(kind)
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    randomize_lora_b(model, std=0.5)
    return model


def _unfused(layer, router, x, global_w=1.0, local_w=1.0):
    """base(x) + s * sum over branches of w * softmax(x W^T)[branch] * B A x, in plain torch."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    probs = torch.softmax(x.to(acc) @ router.weight.to(acc).T, dim=-1)
    out = layer.base_layer(x)
    for i, (adapter, w) in enumerate((("global", global_w), ("local", local_w))):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        out = out + (w * probs[..., i:i + 1] * layer.scaling[adapter]) * ((x @ a.T) @ b.T)
    return out


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (3, 7)])
def test_a_routed_layer_equals_the_unfused_formula_with_every_gradient(shape):
    model = _patched()
    routers = fd.LayerRouters(model)
    routers.reset(7)
    name, layer = dual_lora_layers(model)[0]
    router = routers.routers[0]
    fd.set_trainable(model, "both")
    x = torch.randn(*shape, layer.in_features, requires_grad=True)
    params = [x, router.weight, *(layer.lora_A[n].weight for n in fd.ADAPTERS),
              *(layer.lora_B[n].weight for n in fd.ADAPTERS)]
    upstream = torch.randn(*shape, layer.out_features)

    with fd.route(model, routers):
        fused = layer(x)
    fused_grads = torch.autograd.grad((fused * upstream).sum(), params)
    reference = _unfused(layer, router, x)
    ref_grads = torch.autograd.grad((reference * upstream).sum(), params)

    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert fused_grads[1].abs().sum() > 0  # the router learns
    for got, want in zip(fused_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_router_gradient_of_a_whole_model_matches_the_unfused_model():
    model = _patched()
    routers = fd.LayerRouters(model)
    fd.set_trainable(model, "local")
    inputs = batch("llama", size=2, seq=6)
    with fd.route(model, routers):
        loss = model(**inputs).logits.float().pow(2).mean()
    fused = torch.autograd.grad(loss, list(routers.parameters()))

    layers = dual_lora_layers(model)
    originals = [layer.forward for _, layer in layers]
    for (_, layer), router in zip(layers, routers.routers):  # every layer unfused, in torch
        layer.forward = lambda x, layer=layer, router=router: _unfused(layer, router, x)
    try:
        loss = model(**inputs).logits.float().pow(2).mean()
    finally:
        for (_, layer), forward in zip(layers, originals):
            layer.forward = forward
    unfused = torch.autograd.grad(loss, list(routers.parameters()))
    assert sum(float(g.abs().sum()) for g in fused) > 0
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_float_mix_weights_multiply_the_routed_ones_and_a_zero_skips_its_branch():
    model = _patched()
    routers = fd.LayerRouters(model)
    _, layer = dual_lora_layers(model)[0]
    x = torch.randn(2, 4, layer.in_features)
    with torch.no_grad(), fd.route(model, routers):
        with fd.mix(model, 0.5, 2.0):
            torch.testing.assert_close(layer(x), _unfused(layer, routers.routers[0], x, 0.5, 2.0),
                                       rtol=1e-5, atol=1e-5)
        with fd.mix(model, 0.0, 1.0):
            torch.testing.assert_close(layer(x), _unfused(layer, routers.routers[0], x, 0.0, 1.0),
                                       rtol=1e-5, atol=1e-5)
            lora_a, _, scale = layer._stacked_operands(x)
            assert lora_a.shape[0] == layer.r["local"] and scale.shape == (8, layer.r["local"])
    assert layer._router is None  # detached after the block


def test_routers_save_load_and_refuse_bad_tensors():
    model = _patched()
    routers, other = fd.LayerRouters(model), fd.LayerRouters(model)
    routers.reset(1)
    other.reset(2)
    tensors = routers.tensors()
    assert len(tensors) == len(dual_lora_layers(model))
    assert all(k.endswith(".router.weight") and v.shape[0] == 2 for k, v in tensors.items())
    other.load_tensors(tensors)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), routers.parameters()))
    key = next(iter(tensors))
    with pytest.raises(ValueError, match="missing"):
        other.load_tensors({k: v for k, v in tensors.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        other.load_tensors({**tensors, key: torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="non-finite"):
        other.load_tensors({**tensors, key: torch.full_like(tensors[key], float("nan"))})
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), routers.parameters()))


def test_routing_refuses_other_layers_tensor_weights_and_client_banks():
    model, small = _patched(), _patched("gpt2")
    routers = fd.LayerRouters(model)
    with pytest.raises(ValueError, match="other layers"):
        with fd.route(small, routers):
            pass
    inputs = batch("llama", size=2, seq=5)
    with fd.route(model, routers), fd.mix(model, torch.tensor([0.5, 1.0]), 1.0):
        with pytest.raises(ValueError, match="float mix weights"):
            model(**inputs)
    fd.add_client(model, "a")
    with fd.route(model, routers), fd.mix(model, 1.0, 1.0, clients=["a", "a"]):
        with pytest.raises(ValueError, match="client bank"):
            model(**inputs)
    with pytest.raises(ValueError, match="no DualLoRALinear"):
        fd.LayerRouters(build("llama")[0])


def test_routed_layer_gradcheck_in_float64():
    model = _patched().double()
    routers = fd.LayerRouters(model).double()
    _, layer = dual_lora_layers(model)[0]
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64, requires_grad=True)
    weight = routers.routers[0].weight

    def routed(x):
        with fd.route(model, routers):
            return layer(x)

    # d/dx by finite differences (the scale carries the router's graph); d/dW against autograd
    # through the unfused formula in float64
    assert torch.autograd.gradcheck(routed, (x,), eps=1e-6, atol=1e-6)
    fused = torch.autograd.grad(routed(x).sum(), weight)[0]
    unfused = torch.autograd.grad(_unfused(layer, routers.routers[0], x).sum(), weight)[0]
    assert fused.abs().sum() > 0
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-12)


def test_a_bf16_base_keeps_fp32_routers_and_a_close_router_gradient():
    model = _patched()
    routers = fd.LayerRouters(model)
    inputs = batch("llama", size=2, seq=6)

    def router_grads(m, r):
        with fd.route(m, r):
            loss = m(**inputs).logits.float().pow(2).mean()
        return torch.autograd.grad(loss, list(r.parameters()))

    reference = router_grads(model, routers)
    half = _patched().to(torch.bfloat16)
    for (_, a), (_, b) in zip(dual_lora_layers(model), dual_lora_layers(half)):
        for n in fd.ADAPTERS:  # the same adapters, fp32 masters rebuilt under bf16
            b.lora_A[n] = b.lora_A[n].float()
            b.lora_B[n] = b.lora_B[n].float()
            with torch.no_grad():
                b.lora_A[n].weight.copy_(a.lora_A[n].weight)
                b.lora_B[n].weight.copy_(a.lora_B[n].weight)
        b._restack()
    half_routers = fd.LayerRouters(half)
    half_routers.load_tensors(routers.tensors())
    assert all(p.dtype == torch.float32 for p in half_routers.parameters())
    _, layer = dual_lora_layers(half)[0]
    x = torch.randn(2, 4, layer.in_features, dtype=torch.bfloat16)
    with fd.route(half, half_routers), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._scale(x).dtype == torch.float32  # fp32 logits, softmax and scale
    got = router_grads(half, half_routers)
    num = sum(float((g - r).norm()) for g, r in zip(got, reference))
    den = sum(float(r.norm()) for r in reference)
    assert den > 0 and num / den < 0.1  # bf16 activations: measured about 1-3 %


def test_in_op_dropout_under_routers_trains_the_routers():
    model = _patched(dropout=0.3)
    routers = fd.LayerRouters(model)
    model.train()
    inputs = batch("llama", size=2, seq=6)
    torch.manual_seed(0)
    with fd.route(model, routers):
        a = torch.autograd.grad(model(**inputs).logits.pow(2).mean(), list(routers.parameters()))
    torch.manual_seed(0)  # the same masks: the same gradient, bit for bit
    with fd.route(model, routers):
        b = torch.autograd.grad(model(**inputs).logits.pow(2).mean(), list(routers.parameters()))
    assert sum(float(g.abs().sum()) for g in a) > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_routing_refuses_a_source_and_a_merged_model():
    model = _patched()
    routers = fd.LayerRouters(model)
    name, layer = dual_lora_layers(model)[0]

    class Source:
        def factors(self, _):
            return layer.lora_A["local"].weight, layer.lora_B["local"].weight, 1.0

    layer.set_source((Source(), name))
    with fd.route(model, routers), pytest.raises(ValueError, match="adapter source"):
        layer(torch.randn(2, layer.in_features))
    layer.set_source(None)
    fd.merge(model, 1.0, 1.0)
    with pytest.raises(ValueError, match="merged"):
        with fd.route(model, routers):
            pass
    fd.unmerge(model)
    with fd.route(model, routers):
        pass
