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

__all__ = ["COHORT_PADDING", "CohortResult", "passes_by_width", "train_cohort"]

log = logging.getLogger("feddpa_fast.fed")

# The padding a pass may add beyond each client's own batch width, as a share of its positions:
# above it the step splits into more passes (passes_by_width). On the lexical suite one pass of
# 8 clients padded 24 % of its positions where the clients alone padded 8.5 %, and the cohort's
# FedIT round on SmolLM2 took 1.25x the one-client loop's on a 2-core CPU (bench/cohort_round.py
# run 20261207T222923): padding is work. 10 % keeps passes large on the suite.
COHORT_PADDING = 0.10


@dataclasses.dataclass
class CohortResult:
    """A cohort phase's outcome: each finished client's mean loss, each failed client's error,
    and its passes' rows and padding (each pass's padded share times its rows, summed)."""

    losses: dict[str, float]
    failed: dict[str, Exception]
    padded_rows: float = 0.0
    rows: int = 0


def passes_by_width(groups: dict[str, list], task) -> list[list[str]]:
    """The passes of one step: the clients sorted by their batch's longest row, a pass growing
    while the padding it adds beyond each client's own width stays within ``COHORT_PADDING``
    of its positions (each client's rows pad to its pass's width; alone, to its own)."""
    widths = {n: max(task.row_lengths(g)) for n, g in groups.items()}
    passes, current = [], []
    for name in sorted(groups, key=widths.__getitem__):  # stable: ties keep the cohort order
        trial = current + [name]
        positions = sum(len(groups[n]) for n in trial) * widths[name]
        own = sum(len(groups[n]) * widths[n] for n in trial)
        if current and positions - own > COHORT_PADDING * positions:
            passes.append(current)
            trial = [name]
        current = trial
    return passes + [current]


def _one_pass(model, members, names, groups, weights, dropout, scalers, task, phase,
              result) -> dict:
    """Forward and backward of the clients ``names`` in one pass over the client bank; returns
    their losses (a non-finite one is recorded as the client's failure)."""
    bank = {n: dataclasses.replace(members[n].adapters(), generator=dropout[n]) for n in names}
    rows = [n for n in names for _ in groups[n]]
    with client_adapters(model, bank), mix(model, *weights, clients=rows):
        losses, padding = task.group_losses([groups[n] for n in names])
        total = None
        for n, loss in zip(names, losses):
            if not torch.isfinite(loss):
                result.failed[n] = FloatingPointError(
                    f"non-finite training loss in phase {phase.name}")
                continue
            term = scalers[n].scale(loss)
            total = term if total is None else total + term
        if total is not None:
            total.backward()  # inside the block: a recomputation would see the bank
    result.padded_rows += padding * len(rows)
    result.rows += len(rows)
    return dict(zip(names, losses))


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
        groups = {n: [members[n].client.fit[i] for i in plans[n][step]] for n in active}
        losses = {}
        for names in passes_by_width(groups, task):
            losses.update(_one_pass(model, members, names, groups, weights, dropout, scalers,
                                    task, phase, result))
        for n, loss in losses.items():
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
