"""The mixing API: per-instance weights, nesting, errors, set_trainable / print_trainable."""
import pytest
import torch
from tiny_models import batch, build, output_of, randomize_lora_b

import feddpa_fast as fd
from feddpa_fast.layers import dual_lora_layers


def _patched(kind, seed=0):
    model, targets = build(kind, seed)
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets))
    randomize_lora_b(model)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_per_instance_weights_equal_running_each_sequence_alone(kind):
    model = _patched(kind)
    inputs = batch(kind, size=4)
    g = torch.tensor([0.0, 1.0, 0.25, -0.5])
    lw = torch.tensor([1.0, 0.0, 0.75, 2.0])
    with fd.mix(model, g, lw):
        out = output_of(model, inputs)
        out.square().sum().backward()
    batched_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    alone = []
    for i in range(4):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        with fd.mix(model, float(g[i]), float(lw[i])):
            o = output_of(model, one)
            o.square().sum().backward()
        alone.append(o.detach())
    torch.testing.assert_close(out.detach(), torch.cat(alone), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(batched_grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_weights_that_require_grad_receive_gradients():
    model = _patched("llama")
    inputs = batch("llama", size=2)
    w = torch.tensor([0.3, 0.8], requires_grad=True)
    with fd.mix(model, w, 1.0 - w):
        output_of(model, inputs).square().mean().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_nesting_and_exceptions_restore_the_previous_weights():
    model = _patched("llama")
    layers = [layer for _, layer in dual_lora_layers(model)]
    assert all(layer.mix_weights == (1.0, 1.0) for layer in layers)
    with fd.mix(model, 0.2, 0.8):
        with pytest.raises(RuntimeError, match="boom"):
            with fd.mix(model, torch.tensor([1.0, 0.0]), 0.5):
                assert isinstance(layers[0].mix_weights[0], torch.Tensor)
                raise RuntimeError("boom")
        assert all(layer.mix_weights == (0.2, 0.8) for layer in layers)
    assert all(layer.mix_weights == (1.0, 1.0) for layer in layers)


def test_outside_mix_both_adapters_are_on_at_weight_one():
    model = _patched("llama")
    inputs = batch("llama")
    with torch.no_grad(), fd.mix(model, 1.0, 1.0):
        explicit = output_of(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, inputs), explicit, rtol=0, atol=0)


def test_a_batch_that_does_not_match_the_weights_raises():
    model = _patched("llama")
    with fd.mix(model, torch.tensor([0.1, 0.2]), 0.5):
        with pytest.raises(ValueError, match="batch of 2 sequences"):
            output_of(model, batch("llama", size=3))


@pytest.mark.parametrize("g, lw, error", [
    (torch.ones(2, 2, 2), 1.0, ValueError), (torch.tensor([1.0, float("nan")]), 1.0, ValueError),
    (float("inf"), 1.0, ValueError), (torch.ones(2), torch.ones(3), ValueError),
    ("0.5", 1.0, TypeError), (torch.ones(2, dtype=torch.int64), 1.0, TypeError),
    (True, 1.0, TypeError),
])
def test_bad_weights_raise_before_anything_changes(g, lw, error):
    model = _patched("llama")
    with pytest.raises(error):
        with fd.mix(model, g, lw):
            pass
    assert all(layer.mix_weights == (1.0, 1.0) for _, layer in dual_lora_layers(model))


def test_mix_on_an_unpatched_model_raises():
    model, _ = build("llama")
    with pytest.raises(ValueError, match="patch first"):
        with fd.mix(model, 1.0, 0.0):
            pass


def test_set_trainable_and_print_trainable(capsys):
    model = _patched("llama")
    total = sum(p.numel() for p in model.parameters())
    per_adapter = sum(p.numel() for n, p in model.named_parameters() if ".global." in n)
    for which, expected in (("both", 2 * per_adapter), ("global", per_adapter),
                            ("local", per_adapter), ("none", 0)):
        fd.set_trainable(model, which)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == expected
        if which in ("global", "local"):
            assert trainable and all(f".{which}." in n for n in trainable)
        line = fd.print_trainable(model)
        assert line == (f"trainable params: {expected:,d} || all params: {total:,d} || "
                        f"trainable%: {100 * expected / total:.4f}")
        assert capsys.readouterr().out.strip() == line
    with pytest.raises(ValueError, match="which must be one of"):
        fd.set_trainable(model, "base")


def test_training_only_local_leaves_global_untouched():
    model = _patched("llama")
    fd.set_trainable(model, "local")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch("llama")
    with fd.mix(model, 0.5, 0.5):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".local." in n), n
    # The stacked buffers saw the optimizer's in-place update of the local rows/columns.
    for _, layer in dual_lora_layers(model):
        assert layer._stack_intact()


def test_layers_share_one_scale_tensor_per_shape_inside_mix():
    model = _patched("llama")
    layers = [layer for _, layer in dual_lora_layers(model)]
    x = torch.randn(2, 5, layers[0].in_features)
    with fd.mix(model, torch.tensor([0.1, 0.9]), 0.5):
        first, second = layers[0]._scale(x), layers[1]._scale(x)
        assert first is second and first.shape == (10, 8)
        torch.testing.assert_close(first[:5, 0], torch.full((5,), 0.1 * 2.0))
        torch.testing.assert_close(first[5:, 4:], torch.full((5, 4), 0.5 * 2.0))
    assert all(layer._scale_cache is None for layer in layers)
    w = torch.tensor([0.1, 0.9], requires_grad=True)
    with fd.mix(model, w, 0.5):  # a scale with a graph is rebuilt per call
        assert layers[0]._scale(x) is not layers[1]._scale(x)


def test_an_inference_mode_forward_does_not_poison_a_later_training_forward():
    model = _patched("llama")
    inputs = batch("llama", size=2)
    with fd.mix(model, torch.tensor([0.3, 0.7]), torch.tensor([1.0, 0.5])):
        with torch.inference_mode():
            output_of(model, inputs)
        output_of(model, inputs).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_scalar_weight_that_requires_grad_gets_its_gradient():
    model = _patched("llama")
    w = torch.tensor(0.4, requires_grad=True)
    with fd.mix(model, w, 1.0):
        output_of(model, batch("llama", size=2)).square().mean().backward()
    assert w.grad is not None and w.grad != 0
