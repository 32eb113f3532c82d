"""Several clients' adapters in one patched model, served in one batch (docs/patcher.md, "Many
clients in one batch").

A client is a named local adapter, with the model's own global adapter (shared by every client:
serving FedDPA) or a global of its own (simulation: one global copy per client). Every patched
layer keeps the clients' adapters in one bank, the layout ``lora_linear_banked`` reads:

    slot 0        the shared global: a copy of the model's ``global`` adapter, refreshed when a
                  ``mix(..., clients=...)`` block starts (so training the global between blocks
                  is seen by the next one)
    slot 1, 2...  each client's local adapter, and its own global when it has one

``mix(model, global_w, local_w, clients=[...])`` names one client per sequence; the rows rule of
``feddpa_fast.rows`` maps them onto beams, samples and flattened rows, as for the weights. The
bank lives in non-persistent buffers: ``.to()`` moves it, ``state_dict()`` does not hold it
(``save_client`` writes a client in PEFT's format). Bank tensors do not require grad: a
backward through a clients block reaches the inputs and anything upstream, not the bank (set
``requires_grad_`` on ``layer.client_bank_a`` / ``_b`` to get bank gradients).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_key, read_adapter, write_adapter
from .layers import DualLoRALinear, dual_lora_layers

__all__ = ["add_client", "client_names", "remove_clients", "save_client", "client_table"]

SHARED_GLOBAL = 0  # the bank slot of the model's own global adapter


def _layers(model: nn.Module) -> list[tuple[str, DualLoRALinear]]:
    layers = dual_lora_layers(model)
    if not layers:
        raise ValueError("model has no DualLoRALinear layers; call feddpa_fast.patch first")
    return layers


def _registry(model: nn.Module) -> dict:
    """name -> (global slot, local slot): one dict, shared by every layer of the model."""
    layers = _layers(model)
    registry = layers[0][1].client_slots
    for _, layer in layers:
        layer.client_slots = registry
    return registry


def client_names(model: nn.Module) -> list[str]:
    """The clients of a patched model, in the order they were added."""
    return list(_registry(model))


def _adapter_tensors(model, layers, source, adapter: str):
    """{layer name: (A, B)} and the scaling of ``source``: a PEFT directory, or None for the
    model's current ``adapter``."""
    if source is None:
        current = {name: (layer.lora_A[adapter].weight.detach(),
                          layer.lora_B[adapter].weight.detach()) for name, layer in layers}
        return current, layers[0][1].scaling[adapter]
    tensors, _, scaling = read_adapter(model, source, adapter)
    return ({name: (tensors[adapter_key(name, "lora_A")], tensors[adapter_key(name, "lora_B")])
             for name, _ in layers}, scaling)


def add_client(model: nn.Module, name: str, local: str | os.PathLike | None = None,
               global_: str | os.PathLike | None = None, own_global: bool = False) -> None:
    """Adds client ``name`` to every patched layer's bank.

    Args:
        model: a patched model.
        name: the client's name (what ``mix(..., clients=...)`` and ``save_client`` take).
        local: a PEFT LoRA directory with the client's local adapter; None copies the model's
            current ``local`` adapter.
        global_: a PEFT directory with the client's own global adapter (simulation); None with
            ``own_global=False`` gives the client the model's shared global.
        own_global: with ``global_=None``, copy the model's current ``global`` adapter as the
            client's own (a snapshot that later training of the global does not change).
    Returns:
        None.
    Raises:
        ValueError: an empty or taken name, or an unpatched model; FileNotFoundError /
            AdapterError (a ValueError) from reading a directory, before anything changes.
    """
    layers = _layers(model)
    if not isinstance(name, str) or not name:
        raise ValueError(f"client name must be a non-empty string, got {name!r}")
    registry = _registry(model)
    if name in registry:
        raise ValueError(f"client {name!r} is already in the model (remove_clients first)")
    local_ab, local_scaling = _adapter_tensors(model, layers, local, "local")
    own = global_ is not None or own_global
    global_ab, global_scaling = (_adapter_tensors(model, layers, global_, "global") if own
                                 else (None, None))
    for layer_name, layer in layers:
        if layer.client_bank_a is None:
            layer.reset_client_bank()
        global_slot = layer.append_to_bank(*global_ab[layer_name], global_scaling) if own \
            else SHARED_GLOBAL
        local_slot = layer.append_to_bank(*local_ab[layer_name], local_scaling)
    registry[name] = (global_slot, local_slot)


def remove_clients(model: nn.Module) -> None:
    """Drops every client (the banks' memory included) from a patched model."""
    for _, layer in _layers(model):
        layer.drop_client_bank()
    _registry(model).clear()


def save_client(model: nn.Module, name: str, directory: str | os.PathLike,
                adapter: str = "local") -> Path:
    """Writes one client's ``"local"`` (or ``"global"``) adapter as a PEFT LoRA directory.

    Returns:
        The directory, as a ``Path``.
    Raises:
        ValueError: an unknown client or adapter name.
    """
    registry = _registry(model)
    if name not in registry:
        raise ValueError(f"unknown client {name!r}; the model has {sorted(registry)}")
    if adapter not in ("global", "local"):
        raise ValueError(f"adapter must be 'global' or 'local', got {adapter!r}")
    slot = registry[name][0 if adapter == "global" else 1]
    layers = _layers(model)
    if slot == SHARED_GLOBAL:
        layers[0][1].refresh_shared_global()
    tensors, scaling = {}, layers[0][1].client_scaling[slot]
    for layer_name, layer in layers:
        a, b = layer.bank_adapter(slot)
        tensors[adapter_key(layer_name, "lora_A")] = a.to("cpu", copy=True).contiguous()
        tensors[adapter_key(layer_name, "lora_B")] = b.to("cpu", copy=True).contiguous()
    return write_adapter(model, directory, tensors, layers[0][1].r["local"], scaling)


def client_table(model: nn.Module, clients: Sequence[str], device) -> torch.Tensor:
    """(batch, 2) int64 bank slots (global, local) of one client per sequence.

    Raises:
        TypeError: ``clients`` is not a sequence of names. ValueError: an empty batch, or a name
            the model does not hold (the message lists the known ones).
    """
    if isinstance(clients, str) or not isinstance(clients, Sequence):
        raise TypeError(f"clients must be a list of client names, one per sequence, got "
                        f"{type(clients).__name__}")
    if not clients:
        raise ValueError("clients is empty: give one client name per sequence")
    registry = _registry(model)
    unknown = sorted({c for c in clients if c not in registry}, key=str)
    if unknown:
        raise ValueError(f"clients names unknown client(s) {unknown[:5]}; the model holds "
                         f"{list(registry)[:10]}{'...' if len(registry) > 10 else ''} "
                         f"(feddpa_fast.add_client)")
    return torch.tensor([registry[c] for c in clients], dtype=torch.int64, device=device)
