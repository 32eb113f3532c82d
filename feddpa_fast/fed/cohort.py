"""Cohort training (docs/trainer.md, "Cohorts"): the in-process round runs the local steps of
several sampled clients side by side, each step in a few batched passes over the client bank of
the shared model (cohort_train.py), instead of one client after the other.

A round of a cohort: each client decodes its message and loads its state (``begin_round``), and
its method copies what it trains (``Algorithm.cohort_member``); the round's phases run in
lockstep over all of them; then each client in turn gets its trained state back into the model
and saves and uploads it (``finish_round``), exactly as after its own loop. It equals the
one-client-at-a-time loop (``--cohort-size 1``) up to float summation order and the in-op
dropout masks (the cohort pads a client's rows to the longest of the pass, which renumbers
them; docs/trainer.md says what moves).

A cohort is an in-process concept: under Flower each SuperNode holds one client.
"""
from __future__ import annotations

import logging

from .cohort_train import train_cohort

__all__ = ["COHORT_SEQUENCES", "cohort_size", "run_cohort", "run_cohort_post"]

log = logging.getLogger("feddpa_fast.fed")

# The default cohort's bound: at most 64 sequences per pass (8 clients x batch 8, the setting
# bench/cohort_round.py measures on SmolLM2), so the activation memory of a pass stays that of
# one client at batch 64.
COHORT_SEQUENCES = 64


def cohort_size(cfg, sampled: int) -> int:
    """Clients per cohort in a round of ``sampled`` clients: ``--cohort-size`` when set, else
    as many as fit ``COHORT_SEQUENCES`` at ``--batch-size`` (at least 1)."""
    if cfg.cohort_size is not None:
        return max(1, min(cfg.cohort_size, sampled))
    return max(1, min(sampled, COHORT_SEQUENCES // cfg.batch_size))


def run_cohort(clients: list, broadcasts: dict[str, bytes], round_index: int,
               expected) -> tuple[dict, dict[str, dict]]:
    """One round of ``clients`` (``Client`` objects of one run) as a cohort.

    Returns:
        ``(replies, stats)``: ``{client: reply blob, None, or the exception it raised}`` and
        ``{client: stats}`` of the clients that finished, each with its phases' losses and the
        padding fraction of the cohort's passes.
    """
    replies, starts, members = {}, {}, {}
    for client in clients:
        try:
            starts[client.name] = client.begin_round(broadcasts[client.name], round_index,
                                                     expected)
            members[client.name] = client.algorithm.cohort_member(client)
        except Exception as exc:  # a failing client is left out of the round
            log.warning("round %d: client %s raised %r", round_index, client.name, exc)
            replies[client.name] = exc
    stats = {name: {} for name in members}
    padded = rows = 0.0
    by_name = {c.name: c for c in clients}
    for phase in clients[0].algorithm.phases(round_index):
        live = {n: m for n, m in members.items() if n not in replies}
        if not live:
            break
        for name, member in live.items():
            if phase.init_from_global:
                member.load_local(starts[name].received)
        seeds = {n: by_name[n].phase_seed(round_index, phase) for n in live}
        try:
            result = train_cohort(live, phase, seeds, clients[0].task, clients[0].settings)
        except Exception as exc:  # nothing tells which client: the cohort is left out
            log.warning("round %d: cohort %s raised %r", round_index, list(live), exc)
            replies.update(dict.fromkeys(live, exc))
            break
        for name, exc in result.failed.items():
            log.warning("round %d: client %s raised %r", round_index, name, exc)
            replies[name] = exc
        for name, loss in result.losses.items():
            stats[name][f"loss_{phase.name}"] = loss
        padded, rows = padded + result.padded_rows, rows + result.rows
    for name, member in members.items():
        if name in replies:
            continue
        try:
            member.finish()
            stats[name]["padding"] = padded / max(rows, 1.0)
            replies[name], stats[name] = by_name[name].finish_round(
                starts[name], round_index, stats[name])
        except Exception as exc:
            log.warning("round %d: client %s raised %r", round_index, name, exc)
            replies[name] = exc
    return replies, {n: s for n, s in stats.items() if not isinstance(replies.get(n), Exception)}


def run_cohort_post(clients: list, broadcasts: dict[str, bytes], rounds: int, expected) -> None:
    """The method's post step (its ``post_phase``: FedDPA-F's fine-tuning) for ``clients`` as a
    cohort; each client's state is saved as of round ``rounds``. An error stops the run, as in
    the one-client loop."""
    algorithm = clients[0].algorithm
    phase = algorithm.post_phase
    members = {}
    for client in clients:
        algorithm.prepare_post(client, client.begin_post(broadcasts[client.name], rounds,
                                                         expected), rounds)
        members[client.name] = algorithm.cohort_member(client)
    seeds = {c.name: c.phase_seed(rounds, phase) for c in clients}
    result = train_cohort(members, phase, seeds, clients[0].task, clients[0].settings)
    if result.failed:
        raise next(iter(result.failed.values()))
    for client in clients:
        members[client.name].finish()
        client.save_local(rounds)
