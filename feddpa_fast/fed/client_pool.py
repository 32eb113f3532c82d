"""Every client of a run in one model, answered in batches whose rows belong to different
clients (docs/trainer.md, "Many clients in one batch"): the TTP evaluation (fed/pooled_eval.py)
and personalised generation (fed/serve.py).

Loading a client is what its own evaluation does: the method's ``receive`` puts the final
global and the client's local adapter in the model, and ``final_evaluation`` says how it
answers; the local adapter is then copied into the model's client bank
(``feddpa_fast.add_client``), next to the shared global. A pass over rows of many clients is one
``mix(..., clients=...)`` per batch, each row with its client's adapters and its own weights.

How each row is weighted follows its client's evaluation mode: a fixed (global_w, local_w)
(``"global"``, ``"local"``, FDLoRA's fusion weights) or FedDPA's dynamic weighting: the row's
representation under its client's local adapter against that client's seeded anchors, whose
representations are computed once per client and cached.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..client_bank import add_client, remove_clients
from .algorithms.feddpa_weighting import represent_local, similarity_scores, weights_from_scores
from .evaluate import anchors_for, fixed_weights
from .results import FIXED

__all__ = ["ClientPool", "can_pool"]

def can_pool(run) -> bool:
    """Whether ``run``'s clients can be answered in shared batches: more than one client, and
    a method whose final evaluation uses the model's own two adapters (C2A's swaps in generated
    factors per client, FedALT's routes with per-client routers; FedIT's model is the same for
    everyone, so it is scored once)."""
    if len(run.clients) < 2 or run.algorithm.personal_messages:
        return False  # (the bank holds one global adapter for every client)
    evaluation = run.algorithm.final_evaluation(next(iter(run.clients.values())))
    return evaluation.context is None and not evaluation.client_independent


class ClientPool:
    """The clients of a ``Run`` (fed/runner.py) loaded into its model's client bank."""

    def __init__(self, run, *, batch_size: int = 32,
                 on_loaded: Callable | None = None, progress: bool = False):
        """Loads every client of ``run`` (one ``receive`` each) into the bank.

        Args:
            run: a built ``Run`` whose clients all live in this process.
            batch_size: rows per forward / ``generate`` call.
            on_loaded: called as ``on_loaded(client)`` while the client's adapters are the
                model's own (the evaluation saves its outputs there).
            progress: a progress bar while loading.
        """
        from tqdm.auto import tqdm

        self.run, self.task, self.batch_size = run, run.task, batch_size
        self.weighting = run.cfg.weighting
        self.modes: dict[str, str | tuple] = {}
        model = self.task.model
        remove_clients(model)  # a bank left by an earlier pool
        for name, client in tqdm(run.clients.items(), desc="load clients", leave=False,
                                 disable=not progress):
            run.algorithm.receive(client, run.server.message(name), None)
            self.modes[name] = run.algorithm.final_evaluation(client).mode
            if on_loaded is not None:
                on_loaded(client)
            add_client(model, name)  # copies the local adapter now in the model
        self._anchors: dict[str, torch.Tensor] = {}
        self.dynamic = _one_kind(self.modes)

    @property
    def names(self) -> list[str]:
        """The clients, in the run's order."""
        return list(self.modes)

    def close(self) -> None:
        """Drops the bank (the model keeps the last loaded client's adapters)."""
        remove_clients(self.task.model)

    def anchor_representations(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """{client: (k, H)} representations of each client's seeded anchors under its own
        local adapter; computed once per client, in batches across clients."""
        missing = [n for n in dict.fromkeys(names) if n not in self._anchors]
        if missing:
            cfg = self.weighting
            anchors = {n: anchors_for(self.run.clients[n], cfg.k, self.run.cfg.seed)
                       for n in missing}
            rows = [(n, a) for n in missing for a in anchors[n]]
            reps = represent_local(self.task, [a for _, a in rows], cfg.representation,
                                   self.batch_size, clients=[n for n, _ in rows])
            start = 0
            for n in missing:
                self._anchors[n] = reps[start:start + len(anchors[n])]
                start += len(anchors[n])
        return {n: self._anchors[n] for n in names}

    def weights(self, clients: Sequence[str], examples: Sequence,
                assignments: Sequence[str] = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each row's (global_w, local_w), (N,) tensors, keyed as the evaluation keys
        them: ``FIXED`` for fixed modes; each of ``assignments`` (default: the run's) for
        FedDPA's dynamic weighting, whose scores are computed once for all of them."""
        if not self.dynamic:
            pairs = [fixed_weights(self.modes[c]) for c in clients]  # float64: the weights as given
            return {FIXED: (torch.tensor([g for g, _ in pairs], dtype=torch.float64),
                            torch.tensor([w for _, w in pairs], dtype=torch.float64))}
        cfg = self.weighting
        reps = represent_local(self.task, list(examples), cfg.representation, self.batch_size,
                               clients=list(clients))
        anchors = self.anchor_representations(clients)
        score = torch.empty(len(clients), dtype=torch.float32)
        for name in dict.fromkeys(clients):
            rows = torch.tensor([i for i, c in enumerate(clients) if c == name])
            score[rows] = similarity_scores(reps[rows], anchors[name], cfg).float()
        return {a: weights_from_scores(score, cfg, a) for a in (assignments or [cfg.assignment])}

    def predict(self, clients: Sequence[str], examples: Sequence, global_w: torch.Tensor,
                local_w: torch.Tensor, progress: Callable | None = None) -> list[str]:
        """The task's answers (generations, or labels) for rows of many clients, in batches of
        ``batch_size``: each row under its client's adapters and its own weights.
        ``progress(rows)`` is called after each batch."""
        answers = []
        for i in range(0, len(examples), self.batch_size):
            stop = i + self.batch_size
            answers += self.task.predict(list(examples[i:stop]), global_w[i:stop],
                                         local_w[i:stop], clients=list(clients[i:stop]))
            if progress is not None:
                progress(len(examples[i:stop]))
        return answers


def _one_kind(modes: dict) -> bool:
    """True when every client is weighted dynamically, False when none is (one method)."""
    kinds = {mode == "dynamic" for mode in modes.values()}
    if len(kinds) > 1:
        raise ValueError(f"clients of one run mix dynamic and fixed evaluation modes: {modes}")
    return kinds == {True}
