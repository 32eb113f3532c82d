"""FDLoRA: dual LoRA with per-client fusion weights.

Round 0: each client trains its personalized (local) adapter alone and uploads it once; their
average initialises the global adapter. Later rounds: the global adapter alone, uploaded and
averaged; every ``sync_every`` rounds the personalized adapter is first re-synced (restarted
from the received global adapter and trained locally). After the last round, per-client fusion
weights (w_global, w_personal) come from a bounded Nelder-Mead search on a held-out slice of the
client's training data (fdlora_search.py), kept in ``<client state>/fusion.json``; the client is
evaluated with those weights (after a round, before the search, with both adapters at 1).
"""
from __future__ import annotations

import json
from pathlib import Path

from ...adapters import adapter_state_dict
from ...atomic import atomic_write_bytes
from .base import GLOBAL_ALONE, Algorithm, Evaluation, Phase
from .fdlora_search import SearchConfig, fusion_search, holdout_loss

__all__ = ["FDLoRA"]


def _fusion_path(client) -> Path:
    return client.state_dir / "fusion.json"


class FDLoRA(Algorithm):
    name = "fdlora"
    holdout = 0.2        # fraction of a client's training data kept for the search
    sync_every = 2       # rounds between re-syncs of the personalized adapter
    post_step = "fusion search"

    def phases(self, round_index: int) -> list[Phase]:
        if round_index == 0:  # the personalized adapter, trained locally first
            return [Phase("personal", "local", (0.0, 1.0))]
        if round_index % self.sync_every == 0:  # re-sync: restart it from the global one
            return [Phase("resync", "local", (0.0, 1.0), init_from_global=True), GLOBAL_ALONE]
        return [GLOBAL_ALONE]

    def upload(self, client, round_index: int):
        """Round 0 sends the personalized adapters, whose average initialises the global one
        (the method's only local upload); later rounds the global adapter."""
        which = "local" if round_index == 0 else "global"
        return adapter_state_dict(client.task.model, which)

    def post_train(self, client, tensors, rounds: int) -> dict:
        """The fusion search on the held-out slice; writes fusion.json atomically."""
        self.receive(client, tensors, rounds)
        search = SearchConfig()
        # --search-examples caps the slice: each of the 16 evaluations is a forward over it
        # (SmolLM2, 60 held-out examples: about 100 s per client on 2 cores).
        held_out = client.holdout[: self.cfg.search_examples]
        best, value, evaluations = fusion_search(
            lambda g, p: holdout_loss(client.task, held_out, g, p), search)
        record = {"weights": list(best), "holdout_loss": value, "budget": search.budget,
                  "examples": len(held_out),
                  "evaluations": [{"weights": list(w), "loss": v} for w, v in evaluations]}
        atomic_write_bytes(_fusion_path(client), (json.dumps(record, indent=1) + "\n").encode())
        return {}

    def round_evaluation(self, client) -> Evaluation:
        return Evaluation((1.0, 1.0))

    def final_evaluation(self, client) -> Evaluation:
        return Evaluation(tuple(self.client_report(client)["fusion"]["weights"]))

    def client_report(self, client) -> dict:
        return {"fusion": json.loads(_fusion_path(client).read_text())}
