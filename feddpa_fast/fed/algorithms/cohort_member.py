"""A client's part in a cohort (fed/cohort.py): its copy of what a phase trains, kept apart from
the shared model while the cohort's clients train side by side (docs/trainer.md, "Cohorts").

``Algorithm.cohort_member(client)`` makes one right after the client's ``receive``, when the
model holds the client's state; ``finish`` writes the trained state back into the model (and
the method's modules), where the client's ``save_local`` and ``upload`` read it, as after the
one-client-at-a-time loop. ``AdapterMember`` is every method whose phases train the model's
global or local adapter under a fixed mix (``Algorithm.train_target``'s default); FedALT's and
C2A's members extend it (fedalt.py, c2a.py).
"""
from __future__ import annotations

import dataclasses

import torch

from ...adapters import adapter_key
from ...client_training import ClientAdapters
from ...config import ADAPTERS
from ...layers import dual_lora_layers

__all__ = ["AdapterMember", "MemberTarget"]


@dataclasses.dataclass(frozen=True)
class MemberTarget:
    """What a member trains in a phase: the optimizer's parameters, and modules put in
    training mode (the cohort's own pass is the batch context)."""

    params: list[torch.Tensor]
    modules: tuple[torch.nn.Module, ...] = ()


class AdapterMember:
    """A client's global and local adapters (fp32 copies of the model's masters) for a cohort
    phase: the one ``phase.train`` names trains, the other is held fixed."""

    def __init__(self, client):
        self.client = client
        self.layers = [name for name, _ in dual_lora_layers(client.task.model)]
        self.adapters_of = {which: self._copy(which) for which in ADAPTERS}

    def _copy(self, which: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (layer.lora_A[which].weight.detach().clone(),
                       layer.lora_B[which].weight.detach().clone())
                for name, layer in dual_lora_layers(self.client.task.model)}

    def load_local(self, tensors: dict[str, torch.Tensor]) -> None:
        """The local adapter from PEFT-keyed ``tensors`` (a phase's ``init_from_global``)."""
        local = self.adapters_of["local"]
        self.adapters_of["local"] = {
            name: tuple(tensors[adapter_key(name, part)].to(local[name][i].dtype).clone()
                        for i, part in enumerate(("lora_A", "lora_B")))
            for name in self.layers}

    def start_phase(self, phase) -> MemberTarget:
        """What ``phase`` (an ``algorithms.Phase``) trains."""
        params = []
        for which in ADAPTERS:
            for a, b in self.adapters_of[which].values():
                for t in (a, b):
                    t.requires_grad_(which == phase.train)
                    if which == phase.train:
                        params.append(t)
        return MemberTarget(params)

    def weights(self, phase) -> tuple[float, float]:
        """The phase's (global_w, local_w) in the cohort's bank."""
        return phase.weights

    def adapters(self) -> ClientAdapters:
        """This step's adapters for ``feddpa_fast.client_adapters``."""
        return ClientAdapters(local=self.adapters_of["local"], global_=self.adapters_of["global"])

    def finish(self) -> None:
        """Writes the adapters back into the shared model."""
        model = self.client.task.model
        with torch.no_grad():
            for name, layer in dual_lora_layers(model):
                for which in ADAPTERS:
                    a, b = self.adapters_of[which][name]
                    layer.lora_A[which].weight.copy_(a)
                    layer.lora_B[which].weight.copy_(b)
        for which in ADAPTERS:  # nothing keeps a graph or a requires_grad flag
            for a, b in self.adapters_of[which].values():
                a.requires_grad_(False)
                b.requires_grad_(False)
