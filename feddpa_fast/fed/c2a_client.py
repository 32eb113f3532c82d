"""A client's side of C2A: its conditioning (label distribution, mean context embedding) and
the shared hypernetwork (fed/c2a.py) whose generated factors drive the patched layers."""
from __future__ import annotations

import contextlib

import torch

from ..mixing import mix
from .c2a import generated_adapters

__all__ = ["C2AClient", "context_embedding"]


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


class C2AClient:
    """Conditioning of one client; the hypernetwork object is shared in-process (each client
    loads the broadcast state into it before training)."""

    def __init__(self, network, model, label_dist, eval_label_dist, context, scaling: float):
        self.network, self.model = network, model
        self.label_dist, self.eval_label_dist = label_dist, eval_label_dist
        self.context, self.scaling = context, scaling

    def training_factors(self):
        """Context manager: the factors generated from the client's label distribution (with
        a graph to the hypernetwork) drive every patched layer."""
        return generated_adapters(self.model, self.network(self.label_dist, self.context),
                                  self.scaling)

    @contextlib.contextmanager
    def eval_factors(self):
        """Test time (as in C2A): factors from a uniform label distribution, no graph."""
        with torch.no_grad():
            factors = self.network(self.eval_label_dist, self.context)
        with generated_adapters(self.model, factors, self.scaling):
            yield factors

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}
