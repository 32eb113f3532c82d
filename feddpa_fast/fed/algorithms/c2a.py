"""C2A (Kim et al. 2024) adapted to LoRA factors: a hypernetwork (fed/c2a.py), shared and
averaged like an adapter, generates each client's LoRA factors from its label distribution,
its mean context embedding and a layer embedding. Only the hypernetwork travels.

Client state: its conditioning (``Conditioning``), built at setup from every client's data.
The generated factors reach the layers as an explicit adapter source (``fed/c2a.py``,
``GeneratedAdapters``), which takes the place of both stacked adapters. Evaluated (as in the
method) with the factors generated from a uniform label distribution; each client's generated
adapter is saved in PEFT format as its local adapter, the hypernetwork as
``adapters/hypernetwork.safetensors``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from ...atomic import atomic_write_bytes
from ...layers import dual_lora_layers
from ...mixing import mix, set_trainable
from ..c2a import (
    AdapterHypernetwork,
    GeneratedAdapters,
    label_distribution,
    uniform_label_distribution,
)
from ..checkpoint import derive_seed
from .base import Algorithm, Evaluation, Phase, TrainTarget

__all__ = ["C2A", "Conditioning", "context_embedding"]

# Both weights 1: the generated adapter at full strength (the neutral mix, fed/c2a.py).
_FULL = (1.0, 1.0)


@torch.no_grad()
def context_embedding(task, examples, batch_size: int = 32) -> torch.Tensor:
    """Mean over ``examples`` of the base model's mean-pooled last hidden state (adapters off)."""
    task.model.eval()
    total, count = None, 0
    with mix(task.model, 0.0, 0.0):
        for i in range(0, len(examples), batch_size):
            reps = task.represent(examples[i:i + batch_size], "mean").float()
            total = reps.sum(0) if total is None else total + reps.sum(0)
            count += reps.shape[0]
    return total / max(count, 1)


class Conditioning:
    """One client's inputs to the shared hypernetwork: its label distribution for training,
    a uniform one for test time, and its mean context embedding."""

    def __init__(self, network, model, label_dist, eval_label_dist, context, scaling: float):
        self.network, self.model = network, model
        self.label_dist, self.eval_label_dist = label_dist, eval_label_dist
        self.context, self.scaling = context, scaling

    def training_factors(self) -> GeneratedAdapters:
        """The factors of the client's label distribution, with a graph to the network."""
        return GeneratedAdapters(self.model, self.network(self.label_dist, self.context),
                                 self.scaling)

    def eval_factors(self) -> dict:
        """Test time (as in C2A): factors from a uniform label distribution, no graph."""
        with torch.no_grad():
            return self.network(self.eval_label_dist, self.context)

    @contextlib.contextmanager
    def evaluating(self):
        with GeneratedAdapters(self.model, self.eval_factors(), self.scaling):
            yield


class C2A(Algorithm):
    name = "c2a"
    needs_every_client_at_setup = True

    def setup(self, task, train) -> None:
        """The hypernetwork (seeded) and each client's conditioning."""
        cfg = self.cfg
        layers = [(n, m.in_features, m.out_features) for n, m in dual_lora_layers(task.model)]
        if task.kind == "classify":
            num_labels = max(len(e.choices) for examples in train.values() for e in examples)
        else:
            num_labels = 1  # no labels: a constant conditioning input
        contexts = {name: context_embedding(task, examples) for name, examples in train.items()}
        torch.manual_seed(derive_seed(cfg.seed, "hypernetwork-init"))
        context_size = next(iter(contexts.values())).numel()
        self.network = AdapterHypernetwork(layers, cfg.rank, num_labels, context_size)
        self.conditioning = {}
        for name, examples in train.items():
            if task.kind == "classify":
                dist = label_distribution(examples, num_labels)
                uniform = uniform_label_distribution(len(examples[0].choices), num_labels)
            else:
                dist = uniform = torch.ones(1)
            self.conditioning[name] = Conditioning(self.network, task.model, dist, uniform,
                                                   contexts[name], cfg.alpha / cfg.rank)

    def initial_global(self, task):
        return self._network_state()

    def keeps_local(self, rounds: int) -> bool:
        return True  # the generated adapter is saved as the local one

    def phases(self, round_index: int) -> list[Phase]:
        return [Phase("hyper", "hypernetwork", _FULL)]

    def receive(self, client, tensors, before_round) -> None:
        self.network.load_state_dict(tensors)

    def train_target(self, client, phase: Phase) -> TrainTarget:
        set_trainable(client.task.model, "none")
        return TrainTarget(list(self.network.parameters()),
                           self.conditioning[client.name].training_factors,
                           modules=(self.network,))

    def upload(self, client, round_index: int):
        return self._network_state()

    def final_evaluation(self, client) -> Evaluation:
        return Evaluation(_FULL, context=self.conditioning[client.name].evaluating)

    def save_client_outputs(self, client, out: Path) -> None:
        """The client's generated adapter, copied into its local adapter, in PEFT format."""
        factors = self.conditioning[client.name].eval_factors()
        with torch.no_grad():
            for name, layer in dual_lora_layers(client.task.model):
                a, b = factors[name]
                layer.lora_A["local"].weight.copy_(a)
                layer.lora_B["local"].weight.copy_(b)
        super().save_client_outputs(client, out)

    def save_global_outputs(self, task, tensors, out: Path) -> None:
        atomic_write_bytes(out / "adapters" / "hypernetwork.safetensors",
                           st_save(tensors, metadata={"format": "pt"}))

    def _network_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}
