"""A patched layer stays a drop-in for model code that reads the wrapped module's attributes
(weight, bias, in_features, out_features, dtype checks), as PEFT's layers do."""
import pytest
import torch
from tiny_models import batch, build, randomize_lora_b, t5

import feddpa_fast as fd
from feddpa_fast.layers import dual_lora_layers


def _cfg(targets):
    return fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "opt"])
def test_patched_layers_expose_the_wrapped_modules_attributes(kind):
    model, _ = build(kind)
    fd.patch(model, _cfg("all-linear"))
    for name, layer in dual_lora_layers(model):
        base = layer.base_layer
        assert layer.weight is base.weight and layer.bias is base.bias, name
        assert layer.weight.dtype == torch.float32 and layer.weight.device.type == "cpu"
        out_features, in_features = (base.weight.shape[::-1] if layer.fan_in_fan_out
                                     else base.weight.shape)
        assert (layer.in_features, layer.out_features) == (in_features, out_features), name
    model.to(torch.bfloat16)
    assert all(layer.weight.dtype == torch.bfloat16 for _, layer in dual_lora_layers(model))


def test_the_attributes_match_peft_layers():
    peft = pytest.importorskip("peft")
    ours, _ = build("gpt2")
    theirs, _ = build("gpt2")
    fd.patch(ours, _cfg(("c_attn", "c_fc")))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8,
                                                         target_modules=["c_attn", "c_fc"]))
    mine = dict(dual_lora_layers(ours))
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            layer = mine[name.removeprefix("base_model.model.")]
            assert torch.equal(layer.weight, module.weight)
            assert torch.equal(layer.bias, module.bias)
            assert (layer.in_features, layer.out_features) == (module.in_features,
                                                               module.out_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_t5_feed_forward_reads_wo_weight_dtype_through_the_patched_layer(dtype):
    """T5's feed forward does ``hidden.to(self.wo.weight.dtype)`` when they differ: without a
    ``weight`` attribute the patched model's forward raises AttributeError."""
    model = t5().to(dtype)
    inputs = {"input_ids": batch("llama", size=2, seq=6)["input_ids"],
              "decoder_input_ids": batch("llama", size=2, seq=3, seed=1)["input_ids"]}
    with torch.no_grad():
        ref = model(**inputs).logits
        fd.patch(model, _cfg(("wi", "wo")))
        assert len(dual_lora_layers(model)) == 8  # (wi, wo) x (2 encoder + 2 decoder blocks)
        torch.testing.assert_close(model(**inputs).logits, ref, rtol=1e-5, atol=1e-5)
        randomize_lora_b(model)
        g, lw = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5])
        with fd.mix(model, g, lw):
            mixed = model(**inputs).logits
        for i in range(2):
            with fd.mix(model, float(g[i]), float(lw[i])):
                alone = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=tol, atol=tol)
    assert not torch.allclose(mixed.float(), ref.float(), atol=1e-3)
