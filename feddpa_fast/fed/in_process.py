"""The in-process transport: every client of a ``Run`` lives in this process and shares its
one patched model: one client at a time, or a cohort of clients side by side in one batched
pass per local step (fed/cohort.py). It carries the same blobs as the Flower Grid."""
from __future__ import annotations

import logging

from . import final
from .client_pool import can_pool
from .cohort import cohort_size, run_cohort, run_cohort_post
from .pooled_eval import evaluate_pooled

__all__ = ["InProcess"]

log = logging.getLogger("feddpa_fast.fed")


class InProcess:
    """The ``Transport`` (fed/transport.py) of a ``Run`` (runner.py) whose clients are all
    local: exchanges, post step, per-round score and final step."""

    def __init__(self, run, progress: bool = True):
        self.run, self.progress = run, progress

    def _bar(self, items, desc: str):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False, disable=not self.progress)

    def exchange(self, r: int, sampled: list[str], broadcasts: dict[str, bytes]):
        """Runs the round on the sampled clients, in cohorts of ``cohort.cohort_size`` (one at
        a time for 1); a client that raises is left out."""
        replies, stats = {}, []
        expected = self.run.server.expected()
        size = cohort_size(self.run.cfg, len(sampled))
        cohorts = [sampled[i:i + size] for i in range(0, len(sampled), size)]
        with self._bar_total(len(sampled), f"round {r}") as bar:
            for names in cohorts:
                if size == 1:
                    got, got_stats = self._one(names[0], broadcasts, r, expected)
                else:
                    got, got_stats = run_cohort([self.run.clients[n] for n in names],
                                                broadcasts, r, expected)
                stats += [got_stats[n] for n in names if n in got_stats]
                replies.update({n: v for n, v in got.items() if v is not None})
                bar.update(len(names))
        return replies, stats

    def _one(self, name: str, broadcasts, r: int, expected):
        try:
            reply, s = self.run.clients[name].run_round(broadcasts[name], r, expected)
            return {name: reply}, {name: s}
        except Exception as exc:  # a failing client is left out of the round
            log.warning("round %d: client %s raised %r", r, name, exc)
            return {name: exc}, {}

    def _bar_total(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, disable=not self.progress)

    def post_train(self, rounds: int, broadcasts: dict[str, bytes]) -> None:
        """The method's post step on every client: in cohorts when it is one training phase
        (``post_phase``), else one client at a time."""
        expected = self.run.server.expected()
        clients = list(self.run.clients.values())
        size = cohort_size(self.run.cfg, len(clients))
        if size > 1 and self.run.algorithm.post_phase is not None:
            for i in range(0, len(clients), size):
                run_cohort_post(clients[i:i + size], broadcasts, rounds, expected)
            return
        for client in self._bar(clients, self.run.algorithm.post_step):
            client.post_train(broadcasts[client.name], rounds, expected)

    def round_score(self, r: int) -> tuple[float, list[str]]:
        """(mean own-task score after round ``r``, clients left out: none in process)."""
        server = self.run.server
        scores = [final.round_score(self.run, client, server.message(client.name), r)
                  for client in self.run.clients.values()]
        return sum(scores) / len(scores), []

    def finish(self, wall_start: float) -> dict:
        """Every client's final entry, then results.json and plots (fed/final.py): in batched
        passes across clients (fed/pooled_eval.py) where the method allows it and
        ``run.pooled_eval`` is set, else one client at a time."""
        run = self.run
        if run.pooled_eval and run.cfg.final_eval == "all" and can_pool(run):
            per_client = evaluate_pooled(run, self.progress)
        else:
            per_client = final.evaluate_clients(run, self.progress)
        return final.finish(run, per_client, wall_start)
