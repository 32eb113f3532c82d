"""feddpa_fast.client_adapters (client_training.py): several clients' adapters trained in one
batch equal each client trained alone, dropout and routers included."""
import copy

import pytest
import tiny_models
import torch

import feddpa_fast as fd
from feddpa_fast.client_training import ClientAdapters, client_adapters
from feddpa_fast.layers import dual_lora_layers

CLIENTS = ("a", "b", "c")


def _model(dropout: float):
    model, targets = tiny_models.build("llama")
    fd.patch(model, fd.DualLoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=targets))
    return model


def _adapters(model, seed: int) -> dict:
    """{which: {layer: (A, B)}}: random fp32 leaves."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for which in ("global", "local"):
        out[which] = {}
        for name, layer in dual_lora_layers(model):
            a, b = layer.lora_A[which].weight, layer.lora_B[which].weight
            out[which][name] = (torch.randn(a.shape, generator=g) * 0.2,
                                torch.randn(b.shape, generator=g) * 0.2)
    return out


def _loss(model, ids):
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _alone(model, adapters, ids, weights, seed, router=None):
    """The client's loss and gradients run alone, through the model's own parameters."""
    with torch.no_grad():
        for name, layer in dual_lora_layers(model):
            for which in ("global", "local"):
                layer.lora_A[which].weight.copy_(adapters[which][name][0])
                layer.lora_B[which].weight.copy_(adapters[which][name][1])
    fd.set_trainable(model, "both")
    params = {(which, name, i): (layer.lora_A if i == 0 else layer.lora_B)[which].weight
              for name, layer in dual_lora_layers(model) for which in ("global", "local")
              for i in (0, 1)}
    torch.manual_seed(seed)  # the in-op dropout seeds come from torch's generator
    model.train()
    if router is not None:
        with fd.route(model, router), fd.mix(model, *weights):
            loss = _loss(model, ids)
    else:
        with fd.mix(model, *weights):
            loss = _loss(model, ids)
    extra = list(router.parameters()) if router is not None else []
    grads = torch.autograd.grad(loss, list(params.values()) + extra)
    fd.set_trainable(model, "none")
    return loss.detach(), dict(zip(list(params) + [("router", i) for i in range(len(extra))],
                                   grads))


@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_batch_of_clients_equals_each_client_alone(dropout, routed):
    """Rows of three clients in one pass, the sum of their losses backward: each client's loss
    and gradients are its own run alone (same dropout seed stream, same rows per segment)."""
    model = _model(dropout)
    weights = (0.7, 0.4)
    ids = {c: tiny_models._ids(2, 9, seed=i) for i, c in enumerate(CLIENTS)}
    adapters = {c: _adapters(model, seed=10 + i) for i, c in enumerate(CLIENTS)}
    routers = {}
    for i, c in enumerate(CLIENTS):
        if routed:
            routers[c] = fd.LayerRouters(model)
            routers[c].reset(100 + i)
    expected = {c: _alone(model, adapters[c], ids[c], weights, seed=50 + i,
                          router=routers.get(c))
                for i, c in enumerate(CLIENTS)}
    leaves = {c: {w: {n: (a.clone().requires_grad_(), b.clone().requires_grad_())
                      for n, (a, b) in adapters[c][w].items()} for w in adapters[c]}
              for c in CLIENTS}
    bank = {c: ClientAdapters(local=leaves[c]["local"], global_=leaves[c]["global"],
                              generator=torch.Generator().manual_seed(50 + i),
                              router=routers.get(c))
            for i, c in enumerate(CLIENTS)}
    model.train()
    rows = [c for c in CLIENTS for _ in range(2)]
    with client_adapters(model, bank), fd.mix(model, *weights, clients=rows):
        logits = model(input_ids=torch.cat([ids[c] for c in CLIENTS])).logits
        losses = [torch.nn.functional.cross_entropy(
            logits[2 * i:2 * i + 2, :-1].flatten(0, 1), ids[c][:, 1:].flatten())
            for i, c in enumerate(CLIENTS)]
        sum(losses).backward()
    assert fd.client_names(model) == []  # the bank is dropped after the block
    for i, c in enumerate(CLIENTS):
        loss, grads = expected[c]
        torch.testing.assert_close(losses[i].detach(), loss, rtol=1e-5, atol=1e-6)
        for key, grad in grads.items():
            if key[0] == "router":
                got = list(routers[c].parameters())[key[1]].grad
            else:
                which, name, part = key
                got = leaves[c][which][name][part].grad
            torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-6, msg=f"{c} {key}")


def test_refusals():
    model = _model(0.0)
    ok = {"a": ClientAdapters(local=_adapters(model, 0)["local"])}
    fd.add_client(model, "x")
    with pytest.raises(ValueError, match="already holds clients"):
        with client_adapters(model, ok):
            pass
    fd.remove_clients(model)
    with pytest.raises(ValueError, match="no clients"):
        with client_adapters(model, {}):
            pass
    local = dict(_adapters(model, 0)["local"])
    local.pop(next(iter(local)))
    with pytest.raises(ValueError, match="other layers"):
        with client_adapters(model, {"a": ClientAdapters(local=local)}):
            pass
    routed = {"a": ClientAdapters(local=_adapters(model, 0)["local"],
                                  router=fd.LayerRouters(model)),
              "b": copy.copy(ok["a"])}
    with pytest.raises(ValueError, match="every client or to none"):
        with client_adapters(model, routed):
            pass
    assert fd.client_names(model) == []
