"""Several clients' adapters trained in one batch (docs/patcher.md, "Training many clients in
one batch"): the trainer's cohort (feddpa_fast/fed/cohort.py) runs on this.

``client_adapters(model, {name: ClientAdapters(...)})`` puts each client's adapters in the
model's client bank for a ``with`` block, as tensors that may carry gradients to the client's
own parameters (its fp32 masters, or a hypernetwork's output). Inside it,
``mix(model, global_w, local_w, clients=[...])`` runs each sequence through its client's
adapters in one ``lora_linear_banked`` call per layer, and one backward of a sum of the
clients' losses hands each client the gradient of its own loss (rows never mix in the model).

The bank is built once per block by ``torch.stack`` of the clients' current tensors (r x (K + N)
floats per adapter per layer: 0.5 MB for SmolLM2's 8 clients, against hundreds of MB of
activations), so a block per optimizer step sees the step's values. Slot 0 is the model's own
global adapter (a client with ``global_=None`` uses it); each client's local adapter, and its
own global when given, get their own slots.

Per client, optionally:
- a ``torch.Generator`` for the in-op LoRA dropout: each banked call draws the client's mask
  seed from it (one per layer call, as a client alone draws one from torch's generator), so a
  client's masks do not depend on which clients share its batch;
- a router (``feddpa_fast.LayerRouters``): its rows are mixed per token by the client's own
  routers (FedALT), in fp32, times the float mix weights.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .client_bank import SHARED_GLOBAL, _layers, _registry, remove_clients

__all__ = ["ClientAdapters", "client_adapters"]


@dataclasses.dataclass
class ClientAdapters:
    """One client's adapters for ``client_adapters``: ``{layer name: (A (r, K), B (N, r))}``.

    ``global_`` None: the model's own global adapter (bank slot 0). ``scaling``: the local
    adapter's (alpha / r; None: the layer's). ``generator``: the client's dropout seed stream
    (None: torch's generator). ``router``: a ``LayerRouters`` for per-token mixing."""

    local: dict[str, tuple[torch.Tensor, torch.Tensor]]
    global_: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    scaling: float | None = None
    generator: torch.Generator | None = None
    router: nn.Module | None = None


def _check(layers, clients: dict[str, ClientAdapters]) -> None:
    if not clients:
        raise ValueError("client_adapters: no clients given")
    names = {name for name, _ in layers}
    for client, c in clients.items():
        for which, factors in (("local", c.local), ("global_", c.global_)):
            if factors is not None and set(factors) != names:
                raise ValueError(f"client {client!r}: {which} names other layers than the "
                                 f"model's patched ones (missing "
                                 f"{sorted(names - set(factors))[:3]})")
    routed = {c.router is not None for c in clients.values()}
    if len(routed) > 1:
        raise ValueError("client_adapters: give a router to every client or to none")


def _seed_source(slots: dict[str, int], clients: dict[str, ClientAdapters], size: int):
    """A callable giving the (size,) int64 dropout seeds of one banked call: each client's at
    its local slot (its segment's last adapter, kernels/reference_banked.py), drawn from its
    generator; None when no client has a generator."""
    if all(c.generator is None for c in clients.values()):
        return None

    def seeds(device):
        out = torch.zeros(size, dtype=torch.int64)
        for name, c in clients.items():
            gen = c.generator
            out[slots[name]] = torch.randint(0, 2**62, (1,), generator=gen) if gen is not None \
                else torch.randint(0, 2**62, (1,))
        return out.to(device)
    return seeds


@contextlib.contextmanager
def client_adapters(model: nn.Module, clients: dict[str, ClientAdapters]):
    """The clients' adapters in the model's client bank for the ``with`` block (module
    docstring); use ``mix(model, global_w, local_w, clients=[...])`` inside it.

    Args:
        model: a patched model holding no clients (``remove_clients`` first).
        clients: ``{name: ClientAdapters}``; the tensors keep their graphs.

    Returns:
        A context manager yielding ``model``; the bank is dropped when it exits.

    Raises:
        ValueError: the model already holds clients, no clients, layer names that differ from
            the model's, or routers given to some clients only.
    """
    layers = _layers(model)
    registry = _registry(model)
    if registry:
        raise ValueError(f"client_adapters: the model already holds clients "
                         f"{list(registry)[:5]} (remove_clients first)")
    _check(layers, clients)
    slots, next_slot = {}, 1
    for name, c in clients.items():
        own_global = SHARED_GLOBAL if c.global_ is None else next_slot
        next_slot += c.global_ is not None
        slots[name] = (own_global, next_slot)
        next_slot += 1
    size = next_slot
    seeds = _seed_source({n: s[1] for n, s in slots.items()}, clients, size)
    try:
        for index, (layer_name, layer) in enumerate(layers):
            a_parts = [layer.lora_A["global"].weight.detach()]
            b_parts = [layer.lora_B["global"].weight.detach()]
            scaling = [layer.scaling["global"]]
            routers = []
            for c in clients.values():
                if c.global_ is not None:
                    a_parts.append(c.global_[layer_name][0])
                    b_parts.append(c.global_[layer_name][1])
                    scaling.append(layer.scaling["global"])
                a_parts.append(c.local[layer_name][0])
                b_parts.append(c.local[layer_name][1])
                scaling.append(layer.scaling["local"] if c.scaling is None else c.scaling)
                if c.router is not None:
                    routers.append(c.router.routers[index].weight)
            layer.client_bank_a = torch.stack([a.to(a_parts[0].dtype) for a in a_parts])
            layer.client_bank_b = torch.stack([b.to(b_parts[0].dtype) for b in b_parts])
            layer.client_scaling = scaling
            layer.client_routers = _router_bank(routers, slots, size) if routers else None
            layer.client_seed_source = seeds
        registry.update(slots)
        yield model
    finally:
        for _, layer in layers:
            layer.client_routers = layer.client_seed_source = None
        remove_clients(model)


def _router_bank(routers: list[torch.Tensor], slots: dict, size: int) -> torch.Tensor:
    """(size, 2, K): each client's router weight at its local slot, zeros elsewhere (rows read
    the router of their local slot)."""
    zero = torch.zeros_like(routers[0])
    at = {local: w for (_, local), w in zip(slots.values(), routers)}
    return torch.stack([at.get(s, zero) for s in range(size)])
