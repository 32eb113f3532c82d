"""Several clients in one patched model: ``mix(..., clients=...)`` runs every sequence through
its own client's adapters in one batched forward, and equals each sequence run alone with that
client's adapters loaded as the model's own (forward, backward, generate: greedy, beams,
sampling with num_return_sequences), on Llama, GPT-2 and OPT (flattened rows)."""
import pytest
import torch
from tiny_models import batch, build

import feddpa_fast as fd

CLIENTS = ("ann", "bob", "cy")
ORDER = ["bob", "ann", "cy", "ann"]  # unsorted, one client twice
G = torch.tensor([0.4, 1.0, 0.7, 0.2])
L = torch.tensor([0.6, 0.5, 1.2, 1.0])
NEW = 4


def _random_adapter(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_A.{adapter}" in name or f"lora_B.{adapter}" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)


def _setup(kind, tmp_path, own_global=False):
    """A patched model with three clients; returns (model, {client: (global_dir, local_dir)})."""
    model, _ = build(kind)
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    _random_adapter(model, "global", 100)
    fd.save_adapter(model, tmp_path / "shared", adapter="global")
    dirs = {}
    for i, name in enumerate(CLIENTS):
        _random_adapter(model, "local", i)
        fd.save_adapter(model, tmp_path / name, adapter="local")
        global_dir = tmp_path / "shared"
        if own_global:
            _random_adapter(model, "global", 10 + i)
            global_dir = fd.save_adapter(model, tmp_path / f"{name}-global", adapter="global")
        dirs[name] = (global_dir, tmp_path / name)
    fd.load_adapter(model, tmp_path / "shared", adapter="global")
    for name in CLIENTS:
        fd.add_client(model, name, local=dirs[name][1],
                      global_=dirs[name][0] if own_global else None)
    return model, dirs


def _as_model_adapters(model, dirs, name):
    fd.load_adapter(model, dirs[name][0], adapter="global")
    fd.load_adapter(model, dirs[name][1], adapter="local")


def _row(inputs, i):
    return {k: v[i:i + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("own_global", [False, True], ids=["shared-global", "own-global"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_batched_forward_and_backward_equal_each_sequence_alone(kind, own_global, tmp_path):
    model, dirs = _setup(kind, tmp_path, own_global)
    inputs = batch(kind, size=4, seq=6, seed=2)
    embed = model.get_input_embeddings()
    embeds = embed(inputs["input_ids"]).detach().requires_grad_()
    with fd.mix(model, G, L, clients=ORDER):
        logits = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    (grad,) = torch.autograd.grad(logits.square().sum(), embeds)
    for i, name in enumerate(ORDER):
        _as_model_adapters(model, dirs, name)
        one = embeds[i:i + 1].detach().requires_grad_()
        with fd.mix(model, float(G[i]), float(L[i])):
            mask = inputs["attention_mask"][i:i + 1]
            alone = model(inputs_embeds=one, attention_mask=mask).logits
        (grad_one,) = torch.autograd.grad(alone.square().sum(), one)
        torch.testing.assert_close(logits[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad[i:i + 1], grad_one, rtol=1e-3, atol=1e-3)
    # The clients differ: sequence 0 under another client's adapters gives other logits.
    with torch.no_grad(), fd.mix(model, G[:1], L[:1], clients=["cy"]):
        other = model(inputs_embeds=embeds[:1], attention_mask=inputs["attention_mask"][:1]).logits
    assert not torch.allclose(other, logits[:1], atol=1e-3)


@pytest.mark.parametrize("mode", ["greedy", "beams", "sampling"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_generate_for_many_clients_equals_each_alone(kind, mode, tmp_path):
    model, dirs = _setup(kind, tmp_path)
    inputs = batch(kind, size=4, seq=6, seed=5)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
    kw.update({"greedy": dict(do_sample=False),
               "beams": dict(num_beams=2, num_return_sequences=2, do_sample=False),
               "sampling": dict(do_sample=True, num_return_sequences=2, top_k=0)}[mode])
    copies = kw.get("num_return_sequences", 1)
    torch.manual_seed(7)
    with torch.no_grad(), fd.mix(model, G, L, clients=ORDER):
        together = model.generate(**inputs, **kw)
    for i, name in enumerate(ORDER):
        _as_model_adapters(model, dirs, name)
        with torch.no_grad(), fd.mix(model, float(G[i]), float(L[i])):
            if mode == "sampling":
                # Sampling draws per row in batch order: the batched call's draw for row i is
                # not what a call of its own draws, so compare the distributions instead: the
                # first step's scores of each copy equal the sequence's own.
                continue
            alone = model.generate(**_row(inputs, i), **kw)
        assert torch.equal(together[i * copies:(i + 1) * copies], alone), (kind, mode, name)
    if mode == "sampling":
        _check_sampling_scores(model, dirs, inputs, kw, copies)


def _check_sampling_scores(model, dirs, inputs, kw, copies):
    kw = dict(kw, output_logits=True, return_dict_in_generate=True)
    torch.manual_seed(7)
    with torch.no_grad(), fd.mix(model, G, L, clients=ORDER):
        together = model.generate(**inputs, **kw)
    assert together.sequences.shape[0] == len(ORDER) * copies
    for i, name in enumerate(ORDER):
        _as_model_adapters(model, dirs, name)
        with torch.no_grad(), fd.mix(model, float(G[i]), float(L[i])):
            alone = model.generate(**_row(inputs, i), **kw)
        torch.testing.assert_close(together.logits[0][i * copies:(i + 1) * copies],
                                   alone.logits[0], rtol=1e-5, atol=1e-5)


def test_save_client_round_trips_and_peft_reads_it(tmp_path):
    model, dirs = _setup("llama", tmp_path)
    out = fd.save_client(model, "bob", tmp_path / "bob-out")
    fd.load_adapter(model, out, adapter="local")
    fd.load_adapter(model, dirs["bob"][1], adapter="global")  # any other value
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A.local" in n}
    fd.load_adapter(model, dirs["bob"][1], adapter="local")
    for n, p in model.named_parameters():
        if "lora_A.local" in n:
            torch.testing.assert_close(p, expected[n])
    assert fd.client_names(model) == list(CLIENTS)
    fd.remove_clients(model)
    assert fd.client_names(model) == []


def test_without_clients_nothing_changes(tmp_path):
    model, _ = _setup("llama", tmp_path)
    inputs = batch("llama", size=4, seq=6)
    with torch.no_grad(), fd.mix(model, G, L):
        with_bank = model(**inputs).logits
    fd.remove_clients(model)
    with torch.no_grad(), fd.mix(model, G, L):
        without = model(**inputs).logits
    torch.testing.assert_close(with_bank, without, rtol=0, atol=0)


@pytest.mark.parametrize("clients, error, words", [
    (["ann", "zed", "bob", "cy"], ValueError, "unknown client"),
    (["ann", "bob"], ValueError, "clients names 2 sequences but the weights are given for a "
                                 "batch of 4"),
    ("ann", TypeError, "list of client names"),
    ([], ValueError, "clients is empty"),
])
def test_bad_clients_raise_naming_them(tmp_path, clients, error, words):
    model, _ = _setup("llama", tmp_path)
    with pytest.raises(error, match=words):
        with fd.mix(model, G, L, clients=clients):
            pass


def test_add_client_refuses_a_taken_name_and_a_bad_directory(tmp_path):
    model, _ = _setup("llama", tmp_path)
    with pytest.raises(ValueError, match="already in the model"):
        fd.add_client(model, "ann")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fd.add_client(model, "dan", local=tmp_path / "nowhere")
    assert fd.client_names(model) == list(CLIENTS)
