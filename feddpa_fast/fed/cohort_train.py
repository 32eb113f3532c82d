"""One phase of a cohort's clients in lockstep (fed/cohort.py, docs/trainer.md "Cohorts"): step
s of every client in one forward and one backward over the client bank.

Each client keeps what ``train_phase`` (training.py) gives it alone: its batches (its phase
seed's data order), its AdamW and loss scaler over its own tensors, its in-op dropout seeds
(drawn from a generator seeded with its phase seed), its mean loss. The pass's loss is the sum
of the clients' mean losses, so each client's gradient is its own loss's: rows never mix in the
model. A client whose batches run out leaves the pass; one whose loss is not finite fails
alone (the one-client loop raises for it), and the others go on.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..client_training import client_adapters
from ..mixing import mix, set_trainable
from .training import batch_plan, loss_scaler, optimizer_step

__all__ = ["CohortResult", "train_cohort"]

log = logging.getLogger("feddpa_fast.fed")


@dataclasses.dataclass
class CohortResult:
    """A cohort phase's outcome: each finished client's mean loss, each failed client's error,
    and the padded and all token positions of its passes."""

    losses: dict[str, float]
    failed: dict[str, Exception]
    padded: float = 0.0
    positions: float = 0.0


def train_cohort(members: dict, phase, seeds: dict[str, int], task, settings) -> CohortResult:
    """Trains ``phase`` on every member (``{client: cohort member}``, algorithms/cohort_member.py)
    at once; ``seeds``: each client's phase seed (``Client.phase_seed``)."""
    model = task.model
    first = next(iter(members.values()))
    weights = first.weights(phase)
    targets = {n: m.start_phase(phase) for n, m in members.items()}
    optimizers = {n: torch.optim.AdamW(t.params, lr=settings.lr,
                                       weight_decay=settings.weight_decay)
                  for n, t in targets.items()}
    scalers = {n: loss_scaler(model) for n in members}
    plans = {n: batch_plan(len(m.client.fit), settings, torch.Generator().manual_seed(seeds[n]))
             for n, m in members.items()}
    dropout = {n: torch.Generator().manual_seed(seeds[n]) for n in members}
    # The base model's own dropout (MiniLM's hidden dropout) draws over the whole pass from
    # torch's generator: one stream per cohort phase, seeded by its first client.
    torch.manual_seed(seeds[next(iter(members))])
    set_trainable(model, "none")
    model.train()
    for target in targets.values():
        for module in target.modules:
            module.train()
    result = CohortResult({n: [] for n in members}, {})
    skipped = dict.fromkeys(members, 0)
    for step in range(max((len(p) for p in plans.values()), default=0)):
        active = [n for n in members if n not in result.failed and step < len(plans[n])]
        if not active:
            break
        groups = [[members[n].client.fit[i] for i in plans[n][step]] for n in active]
        rows = [n for n, group in zip(active, groups) for _ in group]
        bank = {n: dataclasses.replace(members[n].adapters(), generator=dropout[n])
                for n in active}
        with client_adapters(model, bank), mix(model, *weights, clients=rows):
            losses, padding = task.group_losses(groups)
            total = None
            for n, loss in zip(active, losses):
                if not torch.isfinite(loss):
                    result.failed[n] = FloatingPointError(
                        f"non-finite training loss in phase {phase.name}")
                    continue
                term = scalers[n].scale(loss)
                total = term if total is None else total + term
            if total is not None:
                total.backward()  # inside the block: a recomputation would see the bank
        width = sum(len(g) for g in groups)
        result.padded += padding * width
        result.positions += width
        for n, loss in zip(active, losses):
            if n not in result.failed:
                skipped[n] += optimizer_step(optimizers[n], scalers[n])
                result.losses[n].append(loss.item())
    model.eval()
    for target in targets.values():
        for module in target.modules:
            module.eval()
    for n, count in skipped.items():
        if count:
            log.warning("client %s, phase %s: %d of %d fp16 steps overflowed and were skipped "
                        "(loss scaling)", n, phase.name, count, len(result.losses[n]))
    result.losses = {n: sum(v) / max(len(v), 1) for n, v in result.losses.items()
                     if n not in result.failed}
    return result
