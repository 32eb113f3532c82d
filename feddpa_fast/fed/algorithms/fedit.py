"""FedIT: every round, each client trains the global adapter alone (mix 1, 0) from the received
global and uploads it. Evaluated with the global adapter alone, the same model for everyone."""
from __future__ import annotations

from .base import Algorithm, Evaluation

__all__ = ["FedIT"]


class FedIT(Algorithm):
    name = "fedit"

    def final_evaluation(self, client) -> Evaluation:
        return Evaluation("global", client_independent=True)
