"""Per-sequence mixes through generate(): beams and samples keep their sequence's weights, on
every tiny architecture (tests/tiny_models.py), OPT with "all-linear" (its decoder MLP sees a
flattened (batch * seq, hidden) input) included. Batched results equal each sequence run alone.
"""
import pytest
import torch
from tiny_models import BUILDERS, DECODERS, batch, build, output_of, randomize_lora_b

import feddpa_fast as fd

G = torch.tensor([0.0, 1.0, -0.5])
L = torch.tensor([1.0, 0.25, 1.5])
NEW = 4  # new tokens per generate call


def _patched(kind, targets="all-linear"):
    model, default = build(kind)
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0,
                                      target_modules=targets or default))
    randomize_lora_b(model, std=0.5)  # large enough that the mix changes the argmax
    return model


def _prompts(kind):
    # Equal-length prompts: no padding, so "alone" and "batched" see the same tokens.
    return batch(kind, size=3, seq=6, seed=3)


def _generate(model, inputs, **kw):
    return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True, **kw)


def _row(inputs, i):
    return {k: v[i:i + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("kind", DECODERS)
def test_beam_search_under_a_per_sequence_mix_equals_each_sequence_alone(kind):
    model = _patched(kind)
    inputs = _prompts(kind)
    with torch.no_grad(), fd.mix(model, G, L):
        out = _generate(model, inputs, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.sequences.shape[0] == 6  # 3 prompts x 2 beams returned
    alone = []
    for i in range(3):
        with torch.no_grad(), fd.mix(model, float(G[i]), float(L[i])):
            one = _generate(model, _row(inputs, i), num_beams=2, num_return_sequences=2,
                            do_sample=False)
        alone.append(one)
        assert torch.equal(out.sequences[2 * i:2 * i + 2], one.sequences), (kind, i)
        # The first step is the prompt's logits, before any beam reordering.
        torch.testing.assert_close(out.logits[0][2 * i:2 * i + 2], one.logits[0],
                                   rtol=1e-5, atol=1e-5)
    # The weights matter: sequence 0 under sequence 1's weights generates something else.
    with torch.no_grad(), fd.mix(model, float(G[1]), float(L[1])):
        other = _generate(model, _row(inputs, 0), num_beams=2, num_return_sequences=2,
                          do_sample=False)
    assert not torch.allclose(other.logits[0], alone[0].logits[0])


@pytest.mark.parametrize("kind", DECODERS)
def test_sampling_with_num_return_sequences_keeps_each_sequence_weights(kind):
    model = _patched(kind)
    inputs = _prompts(kind)
    torch.manual_seed(0)
    with torch.no_grad(), fd.mix(model, G, L):
        out = _generate(model, inputs, do_sample=True, num_return_sequences=2, top_k=0)
    seqs = out.sequences
    assert seqs.shape == (6, 6 + NEW)
    # Every step's logits (the first from the prompt, then one cached decoding step each) equal
    # a plain forward of that row's tokens alone under its own sequence's weights.
    for j in range(6):
        i = j // 2  # num_return_sequences expands with repeat_interleave
        with torch.no_grad(), fd.mix(model, float(G[i]), float(L[i])):
            full = model(input_ids=seqs[j:j + 1]).logits[0]
        for step in range(NEW):
            torch.testing.assert_close(out.logits[step][j], full[5 + step],
                                       rtol=1e-4, atol=1e-4, msg=f"{kind} row {j} step {step}")


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_an_expanded_batch_gives_each_copy_its_sequence_weights(kind):
    """model(repeat_interleave(batch, 3)) under a 2-sequence mix == each sequence alone."""
    model = _patched(kind, targets=None if kind == "bert" else "all-linear")
    inputs = batch(kind, size=2, seq=5)
    expanded = {k: v.repeat_interleave(3, dim=0) for k, v in inputs.items()}
    g, lw = G[:2], L[:2]
    with torch.no_grad(), fd.mix(model, g, lw):
        out = output_of(model, expanded)
    for i in range(2):
        with torch.no_grad(), fd.mix(model, float(g[i]), float(lw[i])):
            one = output_of(model, _row(inputs, i))
        for copy in range(3):
            torch.testing.assert_close(out[3 * i + copy], one[0], rtol=1e-5, atol=1e-5)


def test_opt_flattens_its_mlp_input_and_the_rows_follow_the_sequences():
    model = _patched("opt")
    seen = []
    fc1 = model.model.decoder.layers[0].fc1
    hook = fc1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    inputs = batch("opt", size=3, seq=5)
    with torch.no_grad(), fd.mix(model, G, L):
        out = output_of(model, inputs)
    hook.remove()
    assert seen == [torch.Size([15, 32])]  # (batch * seq, hidden): the flattened case
    for i in range(3):
        with torch.no_grad(), fd.mix(model, float(G[i]), float(L[i])):
            torch.testing.assert_close(out[i], output_of(model, _row(inputs, i))[0],
                                       rtol=1e-5, atol=1e-5)


def test_a_row_count_that_is_not_a_multiple_of_the_batch_raises():
    model = _patched("llama")
    with fd.mix(model, G[:2], L[:2]):
        with pytest.raises(ValueError, match=r"first dim 3 is not a multiple of 2"):
            output_of(model, batch("llama", size=3))
        with pytest.raises(ValueError, match="input is empty"):
            output_of(model, batch("llama", size=0))
