"""Local-only: every round, each client trains its local adapter alone (mix 0, 1); nothing is
uploaded. Evaluated with the local adapter alone."""
from __future__ import annotations

from .base import LOCAL_ALONE, Algorithm, Evaluation, Phase

__all__ = ["LocalOnly"]


class LocalOnly(Algorithm):
    name = "local"
    uploads = False

    def phases(self, round_index: int) -> list[Phase]:
        return [LOCAL_ALONE]

    def final_evaluation(self, client) -> Evaluation:
        return Evaluation("local")
