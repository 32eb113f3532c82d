"""FedDPA (Yang et al. 2024): a global adapter learned by federated averaging plus a local one
kept on each client, mixed per test instance by FedDPA's dynamic weighting (feddpa_weighting.py).

    feddpa-f  FedIT for every round, then each client fine-tunes a local adapter initialised
              from the final global one (mix 0, 1).
    feddpa-t  round 0: the global phase only. Later rounds: first the local adapter, with the
              received global mixed in but frozen (local weight a = 0.5, global 1 - a), then
              the global adapter alone from the received global; upload the global adapter.
"""
from __future__ import annotations

from ...adapters import load_adapter_state_dict
from ..training import train_phase
from .base import GLOBAL_ALONE, Algorithm, Evaluation, Phase

__all__ = ["FedDPAF", "FedDPAT"]


class _FedDPA(Algorithm):
    def final_evaluation(self, client) -> Evaluation:
        return Evaluation("dynamic")


class FedDPAF(_FedDPA):
    """FedDPA-F: the federated phase is FedIT's; the local adapter is fine-tuned after it."""

    name = "feddpa-f"
    post_step = "finetune"
    post_phase = Phase("finetune", "local", (0.0, 1.0))
    shares_rounds_with = "fedit"

    def round_evaluation(self, client) -> Evaluation:
        """During the rounds there is no local adapter yet: the global adapter alone, as
        FedIT (so the reused rounds' metrics are FedIT's too)."""
        return Evaluation("global")

    def keeps_local(self, rounds: int) -> bool:
        return True

    def prepare_post(self, client, tensors, rounds: int) -> None:
        """Both adapters from the final global one."""
        model = client.task.model
        load_adapter_state_dict(model, tensors, "global")
        load_adapter_state_dict(model, tensors, "local")

    def post_train(self, client, tensors, rounds: int) -> dict:
        """A local adapter initialised from the final global one, trained alone; saved as the
        local adapter of round ``rounds``."""
        self.prepare_post(client, tensors, rounds)
        loss = train_phase(client, self.post_phase, client.phase_seed(rounds, self.post_phase))
        client.save_local(rounds)
        return {"loss_finetune": loss}


class FedDPAT(_FedDPA):
    """FedDPA-T: global and local adapters trained in turn every round after the first."""

    name = "feddpa-t"
    local_mix = 0.5  # the local weight a of the local phase

    def phases(self, round_index: int) -> list[Phase]:
        if round_index == 0:  # nothing to personalise against yet
            return [GLOBAL_ALONE]
        a = self.local_mix
        return [Phase("local", "local", (1.0 - a, a)), GLOBAL_ALONE]
