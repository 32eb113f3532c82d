"""The in-process transport: every client of a ``Run`` lives in this process and shares its
one patched model (one client at a time). It carries the same blobs as the Flower Grid."""
from __future__ import annotations

import logging

from ..evaluate import evaluate_client
from . import final

__all__ = ["InProcess", "limit"]

log = logging.getLogger("feddpa_fast.fed")


def limit(examples, n):
    """The first ``n`` examples (all of them when ``n`` is None)."""
    return list(examples)[:n] if n else list(examples)


class InProcess:
    """Exchanges, post step, per-round score and final step of a ``Run`` (runner.py) whose
    clients are all local."""

    def __init__(self, run, progress: bool = True):
        self.run, self.progress = run, progress

    def _bar(self, items, desc: str):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False, disable=not self.progress)

    def exchange(self, r: int, sampled: list[str], broadcast: bytes):
        """Runs the round on each sampled client; a client that raises is left out."""
        replies, stats = {}, []
        expected = self.run.server.expected()
        for name in self._bar(sampled, f"round {r}"):
            try:
                reply, s = self.run.clients[name].run_round(broadcast, r, expected)
                stats.append(s)
                if reply is not None:
                    replies[name] = reply
            except Exception as exc:  # a failing client is left out of the round
                log.warning("round %d: client %s raised %r", r, name, exc)
                replies[name] = exc
        return replies, stats

    def post_train(self, rounds: int, broadcast: bytes) -> None:
        """The method's post step on every client."""
        expected = self.run.server.expected()
        for client in self._bar(list(self.run.clients.values()), self.run.algorithm.post_step):
            client.post_train(broadcast, rounds, expected)

    def round_score(self, r: int) -> float:
        """Mean own-task score after round ``r`` (the method's round evaluation)."""
        run = self.run
        scores = []
        for name, client in run.clients.items():
            run.algorithm.receive(client, run.server.expected(), r + 1)
            evaluation = run.algorithm.round_evaluation(client)
            with final.entered(evaluation):
                result = evaluate_client(
                    run.task, client, evaluation.mode, {name: limit(run.test[name],
                                                                    run.cfg.test_limit)},
                    own=name, seed=run.cfg.seed, weighting=run.cfg.weighting, own_only=True)
            scores.append(next(iter(result.values()))["P"])
        return sum(scores) / len(scores)

    def finish(self, wall_start: float) -> dict:
        """Final evaluation, adapters, results.json and plots (fed/final.py)."""
        return final.finish(self.run, wall_start, progress=self.progress)
