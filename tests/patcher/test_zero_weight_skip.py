"""A branch at a float mix weight of 0 is skipped (the op sees rank r, not 2r); both at 0 is the
base layer; a tensor of zeros is still computed. Outputs and gradients equal the computed
branch at scale 0. Also: a half-precision base keeps fp32 adapter masters."""
import pytest
import torch
from tiny_models import batch, build, output_of, randomize_lora_b

import feddpa_fast as fd
from feddpa_fast import layers
from feddpa_fast.layers import dual_lora_layers

R = 4


@pytest.fixture()
def model():
    m, targets = build("llama")
    fd.patch(m, fd.DualLoRAConfig(r=R, alpha=8, dropout=0.0, target_modules=targets))
    randomize_lora_b(m)
    return m


@pytest.fixture()
def ranks_seen(monkeypatch) -> list:
    seen, real = [], layers.lora_linear

    def spy(x, weight, bias, lora_a, lora_b, scale, **kw):
        seen.append(lora_a.shape[0])
        return real(x, weight, bias, lora_a, lora_b, scale, **kw)

    monkeypatch.setattr(layers, "lora_linear", spy)
    return seen


@pytest.mark.parametrize("on", ["global", "local"])
def test_one_branch_at_float_zero_runs_rank_r_and_equals_its_scale_0_result(
        model, ranks_seen, on):
    fd.set_trainable(model, "both")
    weights = (0.7, 0.0) if on == "global" else (0.0, 0.7)
    inputs = batch("llama")
    grads = {}
    # Per-sequence weights (a tensor of zeros for the off branch) are computed (rank 2r, scale
    # 0): the reference.
    per_sequence = tuple(torch.full((3,), v) for v in weights)
    for kind, w in (("skipped", weights), ("computed", per_sequence)):
        model.zero_grad(set_to_none=True)
        ranks_seen.clear()
        with fd.mix(model, *w):
            out = output_of(model, inputs)
            out.square().sum().backward()
        assert set(ranks_seen) == ({R} if kind == "skipped" else {2 * R}), kind
        grads[kind] = (out.detach(), {n: p.grad for n, p in model.named_parameters()
                                      if p.requires_grad})
    (skipped, g_skipped), (computed, g_computed) = grads["skipped"], grads["computed"]
    torch.testing.assert_close(skipped, computed, rtol=1e-5, atol=1e-6)
    for name, grad in g_computed.items():
        if f".{on}." in name:
            torch.testing.assert_close(g_skipped[name], grad, rtol=1e-5, atol=1e-6)
        else:  # the skipped branch's gradient is 0, as its computed one at scale 0
            assert not g_skipped[name].abs().any() and not grad.abs().any(), name


def test_both_at_float_zero_is_the_base_model(model, ranks_seen):
    inputs = batch("llama")
    base, _ = build("llama")  # the same seed: the weights the patch wrapped
    with torch.no_grad(), fd.mix(model, 0.0, 0):
        out = output_of(model, inputs)
    assert ranks_seen == []
    with torch.no_grad():
        torch.testing.assert_close(out, output_of(base, inputs), rtol=0, atol=0)


def test_a_half_precision_base_keeps_fp32_adapter_masters_and_gradients():
    base, targets = build("llama")
    base.to(torch.bfloat16)  # patched in bf16: the adapters are created fp32
    fd.patch(base, fd.DualLoRAConfig(r=R, alpha=8, dropout=0.0, target_modules=targets))
    randomize_lora_b(base)
    for _, layer in dual_lora_layers(base):
        assert layer.weight.dtype == torch.bfloat16
        assert layer.lora_A["global"].weight.dtype == torch.float32
        assert layer.lora_B["local"].weight.dtype == torch.float32
    fd.set_trainable(base, "both")
    with fd.mix(base, 0.5, 0.5):
        out = output_of(base, batch("llama"))
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    trained = [p for p in base.parameters() if p.requires_grad]
    assert trained and all(p.grad.dtype == torch.float32 and p.grad.abs().any()
                           for p in trained)


@pytest.mark.parametrize("kind", ["per_sequence", "per_token", "scalar_with_grad"])
def test_a_float_zero_beside_a_tensor_weight_keeps_its_rows_and_graph(model, ranks_seen, kind):
    """mix(model, 0.0, w) with w a tensor: the global branch is skipped, the local one keeps
    w's rows (or w's gradient), equal to computing both with a zero tensor for global."""
    inputs = batch("llama")
    w = {"per_sequence": torch.tensor([0.3, 0.9, -0.4]),
         "per_token": torch.rand(3, 7, generator=torch.Generator().manual_seed(0)),
         "scalar_with_grad": torch.tensor(0.6, requires_grad=True)}[kind]
    grads, outs = [], []
    for global_w in (0.0, torch.zeros_like(w.detach()) if w.dim() else torch.zeros(3)):
        ranks_seen.clear()
        if w.grad is not None:
            w.grad = None
        with fd.mix(model, global_w, w):
            out = output_of(model, inputs)
        outs.append(out)
        if w.requires_grad:
            out.square().sum().backward()
            grads.append(w.grad.clone())
        expected = R if isinstance(global_w, float) else 2 * R
        assert set(ranks_seen) == {expected}, (kind, global_w)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    if grads:
        assert grads[0].abs() > 0
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
