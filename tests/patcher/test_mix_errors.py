"""Bad input to feddpa_fast.mix: each case raises a clear error naming the argument, and the
model is left as it was (weights, caches, hooks, parameters, outputs)."""
import pytest
import torch
from tiny_models import batch, build, output_of, randomize_lora_b

import feddpa_fast as fd
from feddpa_fast.layers import dual_lora_layers

NAN, INF = float("nan"), float("inf")


@pytest.fixture()
def model():
    m, targets = build("llama")
    fd.patch(m, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets))
    randomize_lora_b(m)
    return m


def _untouched(model, params, reference):
    for _, layer in dual_lora_layers(model):
        assert layer.mix_weights == (1.0, 1.0)
        assert layer._scale_cache is None and layer._mix_call is None
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(output_of(model, batch("llama")), reference)


# (global_w, local_w, error type, message pattern): the pattern names the bad argument.
CASES = [
    (torch.tensor([1.0, NAN]), 1.0, ValueError, "global_w has non-finite"),
    (0.5, torch.tensor([[1.0, INF]]), ValueError, "local_w has non-finite"),
    (NAN, 1.0, ValueError, "global_w must be finite"),
    (1.0, -INF, ValueError, "local_w must be finite"),
    (torch.tensor(NAN), 1.0, ValueError, "global_w has non-finite"),
    (torch.ones(2, dtype=torch.int64), 1.0, TypeError, "global_w must be a floating-point"),
    (1.0, torch.ones(2, dtype=torch.bool), TypeError, "local_w must be a floating-point"),
    (torch.ones(2, dtype=torch.complex64), 1.0, TypeError, "global_w must be a floating-point"),
    (True, 1.0, TypeError, "global_w must be a float"),
    ("0.5", 1.0, TypeError, "global_w must be a float"),
    (1.0, [0.5, 0.5], TypeError, "local_w must be a float"),
    (torch.ones(0), 1.0, ValueError, "global_w has a zero-length batch"),
    (1.0, torch.ones(3, 0), ValueError, "local_w has a zero-length batch or seq_len"),
    (torch.ones(2, 3, 4), 1.0, ValueError, r"global_w must be .*got shape \(2, 3, 4\)"),
    (torch.ones(2, device="meta"), 1.0, ValueError, "global_w is on meta.*adapters are on"),
    (1.0, torch.ones(2, 5, device="meta"), ValueError, "local_w is on meta"),
    (torch.ones(2), torch.ones(3), ValueError, "different batch sizes"),
    (torch.ones(2, 4), torch.ones(2, 5), ValueError, "different seq_len"),
]


@pytest.mark.parametrize("g, lw, error, pattern", CASES)
def test_bad_weights_raise_naming_the_argument_and_change_nothing(model, g, lw, error, pattern):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = output_of(model, batch("llama"))
    with pytest.raises(error, match=pattern):
        with fd.mix(model, g, lw):
            pytest.fail("the with block must not run")
    _untouched(model, params, reference)


@pytest.mark.parametrize("g, inputs, pattern", [
    (torch.ones(2, 9), batch("llama", size=2, seq=7),
     "global_w gives one weight per token for seq_len 9"),
    (torch.ones(2), batch("llama", size=3, seq=7), "first dim 3 is not a multiple of 2"),
    (torch.ones(2), batch("llama", size=0, seq=7), "input is empty"),
])
def test_inputs_the_weights_cannot_cover_raise_at_forward_and_change_nothing(model, g, inputs,
                                                                            pattern):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = output_of(model, batch("llama"))
        with pytest.raises(ValueError, match=pattern):
            with fd.mix(model, g, 1.0):
                output_of(model, inputs)
    _untouched(model, params, reference)


def test_negative_and_half_precision_weights_are_valid(model):
    """Negative weights subtract an adapter (allowed); fp16 / bf16 / fp64 weights are cast to
    the op's fp32 scale, so they equal their fp32 values."""
    inputs = batch("llama", size=2)
    w = torch.tensor([-0.5, 0.25])
    with torch.no_grad():
        with fd.mix(model, w, -1.0):
            ref = output_of(model, inputs)
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            with fd.mix(model, w.to(dtype), -1.0):
                torch.testing.assert_close(output_of(model, inputs), ref, rtol=0, atol=0)
