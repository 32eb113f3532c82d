"""C2A (Kim et al. 2024) adapted to LoRA factors: a hypernetwork (c2a_hypernetwork.py), shared
and averaged like an adapter, generates each client's LoRA factors from its label
distribution, its mean context embedding and a layer embedding. Only the hypernetwork travels.

Setup: each client reports its conditioning (label distribution, mean context embedding)
before round 0; the server sizes and seeds the hypernetwork from the reports; each client
joins with its ``Conditioning`` (its client state).
The generated factors reach the layers as an explicit adapter source (``c2a_hypernetwork.py``,
``GeneratedAdapters``), which takes the place of both stacked adapters. Evaluated (as in the
method) with the factors generated from a uniform label distribution; each client's generated
adapter is saved in PEFT format as its local adapter, the hypernetwork as
``adapters/hypernetwork.safetensors``.
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from ...atomic import atomic_write_bytes
from ...client_training import ClientAdapters
from ...layers import dual_lora_layers
from ...mixing import mix, set_trainable
from ..checkpoint import derive_seed
from .base import Algorithm, Evaluation, Phase, TrainTarget
from .c2a_hypernetwork import (
    AdapterHypernetwork,
    GeneratedAdapters,
    label_distribution,
    uniform_label_distribution,
)
from .cohort_member import AdapterMember, MemberTarget

__all__ = ["C2A", "Conditioning", "context_embedding"]


def _check_report(name: str, report) -> int:
    """A client's conditioning report, checked; returns its context size."""
    try:
        dist = [float(v) for v in report["label_distribution"]]
        context = [float(v) for v in report["context"]]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"C2A: client {name!r} sent no valid conditioning") from None
    values = dist + context
    if not dist or not context or not all(math.isfinite(v) for v in values) \
            or abs(sum(dist) - 1) > 1e-4 or min(dist) < 0:
        raise ValueError(f"C2A: client {name!r} sent a malformed conditioning")
    return len(context)

# Both weights 1: the generated adapter at full strength (the neutral mix, c2a_hypernetwork.py).
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


def _padded(dist: torch.Tensor, num_labels: int) -> torch.Tensor:
    return torch.cat([dist, torch.zeros(num_labels - dist.numel(), dtype=dist.dtype)])


class C2A(Algorithm):
    name = "c2a"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.network: AdapterHypernetwork | None = None
        self.conditioning: dict[str, Conditioning] = {}

    def setup_report(self, task, client) -> dict:
        """The client's conditioning: its label distribution over its own choices (a constant
        for causal LM) and its mean context embedding (what it sends before round 0)."""
        if task.kind == "classify":
            dist = label_distribution(client.train, len(client.train[0].choices))
        else:
            dist = torch.ones(1)  # no labels: a constant conditioning input
        return {"label_distribution": dist.tolist(),
                "context": context_embedding(task, client.train).tolist()}

    def setup(self, task, reports) -> dict:
        """The hypernetwork (seeded), sized by every client's conditioning.

        Raises:
            ValueError: a missing or malformed report (sizes, non-finite values).
        """
        sizes = {_check_report(name, report) for name, report in reports.items()}
        if len(sizes) != 1:
            raise ValueError(f"C2A: the clients' context embeddings differ in size: {sizes}")
        shared = {"num_labels": max(len(r["label_distribution"]) for r in reports.values()),
                  "context_dim": sizes.pop()}
        torch.manual_seed(derive_seed(self.cfg.seed, "hypernetwork-init"))
        self._build_network(task, shared)
        return shared

    def join(self, task, client, shared, report) -> None:
        """The client's conditioning against the shared hypernetwork (built here on a node)."""
        if self.network is None:  # a Flower node: the values come with round 0's broadcast
            self._build_network(task, shared)
        dist = torch.tensor(report["label_distribution"], dtype=torch.float32)
        uniform = uniform_label_distribution(dist.numel(), shared["num_labels"])
        self.conditioning[client.name] = Conditioning(
            self.network, task.model, _padded(dist, shared["num_labels"]), uniform,
            torch.tensor(report["context"], dtype=torch.float32), self.cfg.alpha / self.cfg.r)

    def _build_network(self, task, shared) -> None:
        layers = [(n, m.in_features, m.out_features) for n, m in dual_lora_layers(task.model)]
        self.network = AdapterHypernetwork(layers, self.cfg.r, int(shared["num_labels"]),
                                           int(shared["context_dim"]))

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

    def cohort_member(self, client):
        """A copy of the received hypernetwork, generating the client's factors."""
        return HyperMember(client, self.network, self.conditioning[client.name])

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


class HyperMember(AdapterMember):
    """C2A in a cohort: the client's copy of the received hypernetwork trains; each step its
    generated factors (the client's conditioning) are the client's local slot of the bank,
    alone at full strength (mix 0, 1: what ``GeneratedAdapters`` does in place of both
    adapters)."""

    def __init__(self, client, network, conditioning: Conditioning):
        # No AdapterMember.__init__: C2A trains no adapter of the model, so nothing is copied.
        self.client = client
        self.shared, self.conditioning = network, conditioning
        self.network = copy.deepcopy(network)

    def start_phase(self, phase: Phase) -> MemberTarget:
        return MemberTarget(list(self.network.parameters()), (self.network,))

    def weights(self, phase: Phase) -> tuple[float, float]:
        return (0.0, 1.0)

    def adapters(self) -> ClientAdapters:
        c = self.conditioning
        return ClientAdapters(local=self.network(c.label_dist, c.context), scaling=c.scaling)

    def finish(self) -> None:
        self.shared.load_state_dict(self.network.state_dict())
