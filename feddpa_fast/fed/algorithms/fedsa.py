"""FedSA-LoRA (Guo et al., ICLR 2025): one LoRA per client whose A factors are federated and
whose B factors never leave the client.

On the dual-adapter layer the one LoRA is the **local** adapter, trained alone (mix 0, 1) and
kept in the client's state between rounds, A and B. Every round the client overwrites its A
with the server's aggregate of the A factors, trains A and B, and uploads A only; the server
aggregates the A factors by the run's rule. B starts at zero (PEFT's init) on each client and
stays there, as the method keeps it; A starts from one seeded init shared by every client.
Evaluated with the local adapter alone: the received A and the client's own B.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as st_save

from ...adapters import adapter_state_dict, load_adapter_state_dict
from ...atomic import atomic_write_bytes
from ..checkpoint import derive_seed
from ..training import init_adapter
from .base import LOCAL_ALONE, Algorithm, Evaluation, Phase

__all__ = ["FedSA"]


def a_factors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``lora_A`` entries of an adapter's PEFT state dict."""
    return {k: v for k, v in tensors.items() if ".lora_A." in k}


class FedSA(Algorithm):
    name = "fedsa"

    def initial_global(self, task):
        """The shared A factors: a seeded PEFT init (its B, zero, is not part of the state)."""
        init_adapter(task.model, "global", derive_seed(self.cfg.seed, "global-init"))
        return a_factors(adapter_state_dict(task.model, "global"))

    def phases(self, round_index: int) -> list[Phase]:
        return [LOCAL_ALONE]

    def receive(self, client, tensors, before_round) -> None:
        """The client's own adapter (A and B), then the server's A factors over its A."""
        client.load_local(before_round)
        model = client.task.model
        local = adapter_state_dict(model, "local")
        load_adapter_state_dict(model, {**local, **tensors}, "local")

    def upload(self, client, round_index: int):
        """The A factors of the client's adapter."""
        return a_factors(adapter_state_dict(client.task.model, "local"))

    def final_evaluation(self, client) -> Evaluation:
        return Evaluation("local")

    def save_global_outputs(self, task, tensors, out: Path) -> None:
        """The final shared A factors (PEFT key names): ``adapters/shared_lora_A.safetensors``;
        each client's whole adapter is its local one."""
        atomic_write_bytes(out / "adapters" / "shared_lora_A.safetensors",
                           st_save({k: v.contiguous() for k, v in tensors.items()},
                                   metadata={"format": "pt"}))
