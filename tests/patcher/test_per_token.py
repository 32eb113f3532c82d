"""Per-token mix weights (batch, seq_len): the layer formula, packed sequences through
feddpa_fast.packed_weights, training through the weights, and incremental decoding (the last
column applies to every generated token)."""
import pytest
import torch
from tiny_models import batch, build, output_of, randomize_lora_b

import feddpa_fast as fd
from feddpa_fast.layers import dual_lora_layers


def _patched(kind="llama", targets="all-linear"):
    model, _ = build(kind)
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets))
    randomize_lora_b(model, std=0.5)
    return model


def _explicit(layer, x, wg, wl):
    """base(x) + sum over branches of w[token] * s * B A x, with w (rows, T) or (rows * T,)."""
    out = layer.base_layer(x)
    for adapter, w in (("global", wg), ("local", wl)):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        out = out + w.reshape(*x.shape[:-1], 1) * layer.scaling[adapter] * (x @ a.T) @ b.T
    return out


def test_a_layer_applies_one_weight_per_token_3d_and_flattened():
    model = _patched()
    layer = dual_lora_layers(model)[0][1]
    g = torch.randn(2, 5)
    lw = torch.randn(2, 5)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad(), fd.mix(model, g, lw):
        torch.testing.assert_close(layer(x), _explicit(layer, x, g, lw), rtol=1e-5, atol=1e-5)
        flat = x.reshape(10, -1)  # batch-major (batch * seq, hidden), outside a model call
        torch.testing.assert_close(layer(flat), _explicit(layer, flat, g, lw),
                                   rtol=1e-5, atol=1e-5)
        beams = x.repeat_interleave(3, dim=0)  # 3 copies of each sequence, consecutive
        torch.testing.assert_close(
            layer(beams), _explicit(layer, beams, g.repeat_interleave(3, 0),
                                    lw.repeat_interleave(3, 0)), rtol=1e-5, atol=1e-5)
        model(**batch("llama", size=2, seq=5))  # a model call records, then forgets, positions
        assert layer._mix_call["positions"] is None
        step = torch.randn(2, 1, layer.in_features)  # a decoding step: the last column
        torch.testing.assert_close(layer(step), _explicit(layer, step, g[:, -1:], lw[:, -1:]),
                                   rtol=1e-5, atol=1e-5)


def test_constant_per_token_weights_equal_per_sequence_weights():
    model = _patched()
    inputs = batch("llama", size=3, seq=6)
    g, lw = torch.tensor([0.2, -1.0, 0.7]), torch.tensor([1.0, 0.5, 0.0])
    with torch.no_grad():
        with fd.mix(model, g, lw):
            per_seq = output_of(model, inputs)
        with fd.mix(model, g[:, None].expand(3, 6), lw[:, None].expand(3, 6).clone()):
            per_tok = output_of(model, inputs)
        with fd.mix(model, g[:, None].expand(3, 6), 0.3):  # mixed kinds: a float, a (B, T)
            mixed = output_of(model, inputs)
        with fd.mix(model, g, 0.3):
            mixed_ref = output_of(model, inputs)
    torch.testing.assert_close(per_tok, per_seq, rtol=0, atol=0)
    torch.testing.assert_close(mixed, mixed_ref, rtol=0, atol=0)


def _packed(kind, lengths, seed=5):
    """Three sequences alone and packed into one row (DataCollatorWithFlattening's layout)."""
    seqs = [batch(kind, size=1, seq=n, seed=seed + i)["input_ids"][0]
            for i, n in enumerate(lengths)]
    ids = torch.cat(seqs).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return seqs, ids, pos, cu


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_packed_sequences_with_per_token_weights_equal_each_sequence_alone(kind):
    model = _patched(kind)
    lengths = [4, 6, 3]
    seqs, ids, pos, cu = _packed(kind, lengths)
    g, lw = torch.tensor([0.0, 1.0, -0.5]), torch.tensor([1.0, 0.25, 1.5])
    wg, wl = fd.packed_weights(g, position_ids=pos), fd.packed_weights(lw, cu_seqlens=cu)
    assert wg.shape == (1, 13) and torch.equal(wg[0, 4:10], torch.ones(6))
    with torch.no_grad(), fd.mix(model, wg, wl):
        # use_cache=False: transformers builds the packed (block-diagonal) mask only without
        # a cache, i.e. the training setup that DataCollatorWithFlattening serves.
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    start = 0
    for i, seq in enumerate(seqs):
        with torch.no_grad(), fd.mix(model, float(g[i]), float(lw[i])):
            alone = model(input_ids=seq[None]).logits[0]
        torch.testing.assert_close(packed[start:start + len(seq)], alone, rtol=1e-4, atol=1e-4)
        start += len(seq)


def test_training_a_packed_batch_gives_the_weights_and_adapters_their_gradients():
    model = _patched()
    lengths = [4, 6, 3]
    seqs, ids, pos, _ = _packed("llama", lengths)
    g = torch.tensor([0.3, 0.9, -0.2], requires_grad=True)
    with fd.mix(model, fd.packed_weights(g, position_ids=pos), 1.0):
        model(input_ids=ids, position_ids=pos, use_cache=False).logits.square().sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    alone_g = []
    for i, seq in enumerate(seqs):
        w = g.detach()[i].clone().requires_grad_(True)
        with fd.mix(model, w, 1.0):
            model(input_ids=seq[None]).logits.square().sum().backward()
        alone_g.append(w.grad)
    torch.testing.assert_close(g.grad, torch.stack(alone_g), rtol=1e-4, atol=1e-3)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_per_token_weights_that_require_grad_get_per_token_gradients():
    model = _patched()
    inputs = batch("llama", size=2, seq=5)
    w = torch.full((2, 5), 0.5, requires_grad=True)
    with fd.mix(model, w, 1.0):
        output_of(model, inputs)[:, -1].square().sum().backward()
    assert w.grad.shape == (2, 5) and torch.isfinite(w.grad).all()
    assert (w.grad.abs() > 0).all()  # every token's weight reaches the last position


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_generate_with_per_token_weights_decodes_with_the_last_column(kind):
    """The definition: the prompt runs per token; each cached decoding step (one new token per
    row, OPT's flattened MLP input included) takes the weight of the last prompt column."""
    model = _patched(kind)
    inputs = batch(kind, size=2, seq=5, seed=2)
    g = torch.tensor([[0.0, 1.0, 0.5, -1.0, 0.8], [1.0, 1.0, 0.0, 0.2, -0.6]])
    lw = 1.0 - g
    with torch.no_grad(), fd.mix(model, g, lw):
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    # By hand: prefill with per-token weights, then greedy steps under the last column.
    with torch.no_grad():
        with fd.mix(model, g, lw):
            step = model(**inputs, use_cache=True)
        ids, mask, past = inputs["input_ids"], inputs["attention_mask"], step.past_key_values
        for _ in range(4):
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            with fd.mix(model, g[:, -1], lw[:, -1]):
                step = model(input_ids=nxt, attention_mask=mask, past_key_values=past,
                             use_cache=True)
            past = step.past_key_values
    assert torch.equal(out, ids)
    # The prompt's per-token weights matter: the last column alone gives other prompt logits.
    with torch.no_grad(), fd.mix(model, g[:, -1], lw[:, -1]):
        last_column_only = model(**inputs).logits[:, -1]
    with torch.no_grad(), fd.mix(model, g, lw):
        per_token = model(**inputs).logits[:, -1]
    assert not torch.allclose(last_column_only, per_token, atol=1e-3)


def test_per_token_weights_with_a_different_seq_len_raise_naming_the_argument():
    model = _patched()
    with fd.mix(model, torch.ones(2, 7), 1.0):
        with pytest.raises(ValueError, match=r"global_w gives one weight per token for "
                                             r"seq_len 7.*5 positions per row"):
            output_of(model, batch("llama", size=2, seq=5))
    with fd.mix(model, 0.5, torch.ones(2, 7)):  # generate without a KV cache: T grows
        with pytest.raises(ValueError, match="local_w gives one weight per token"):
            model.generate(**batch("llama", size=2, seq=7), max_new_tokens=2, use_cache=False,
                           pad_token_id=0)
    assert all(layer.mix_weights == (1.0, 1.0) and layer._mix_call is None
               for _, layer in dual_lora_layers(model))
    assert not model._forward_pre_hooks and not model._forward_hooks  # mix's hooks are gone


def test_packed_weights_checks_its_inputs():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    torch.testing.assert_close(fd.packed_weights([0.5, 2.0], position_ids=pos),
                               torch.tensor([[0.5, 0.5, 0.5, 2.0, 2.0]]))
    two_rows = torch.tensor([[0, 1, 0], [0, 1, 2]])  # a new row starts a new sequence
    torch.testing.assert_close(fd.packed_weights(torch.tensor([1.0, 2.0, 3.0]),
                                                 position_ids=two_rows),
                               torch.tensor([[1.0, 1.0, 2.0], [3.0, 3.0, 3.0]]))
    with pytest.raises(ValueError, match="holds 2 sequences but weights has 3"):
        fd.packed_weights([1.0, 2.0, 3.0], position_ids=pos)
    with pytest.raises(ValueError, match="exactly one of"):
        fd.packed_weights([1.0], position_ids=pos, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="increase strictly"):
        fd.packed_weights([1.0, 2.0], cu_seqlens=torch.tensor([0, 3, 3]))
    with pytest.raises(ValueError, match="position_ids must be"):
        fd.packed_weights([1.0], position_ids=torch.zeros(4))
    with pytest.raises(TypeError, match="weights must be"):
        fd.packed_weights("0.5", cu_seqlens=torch.tensor([0, 2]))
