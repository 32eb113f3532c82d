"""The federated server: samples clients, validates their blobs, aggregates, checkpoints.

Transport-agnostic: ``broadcasts`` makes the blob sent to each sampled client (the same global
adapter for most methods; the method's ``message`` decides), and ``aggregate_round`` takes the
replies (blobs, or exceptions for clients that failed), drops
and logs whatever fails validation, and either returns the new global adapter or raises
``TooFewUpdates`` so that the caller redoes the round. The in-process loop
(``fed/runner.py``) and the Flower apps call the same functions.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch

from ..errors import FeddpaError
from . import wire
from .algorithms.base import Algorithm
from .checkpoint import derive_seed

__all__ = ["ServerSettings", "Server", "TooFewUpdates", "round_row"]

log = logging.getLogger("feddpa_fast.fed")


class TooFewUpdates(FeddpaError, RuntimeError):
    """Fewer valid updates than ``min_clients``: the round must be redone."""


# Not run settings: how often a round with too few valid updates is redone, and the largest
# blob the server decodes (a hostile peer cannot make it allocate more).
MAX_ATTEMPTS = 3
MAX_BLOB_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Sampling (``fraction`` of the clients, or ``per_round`` clients when set), the
    aggregation rule (``fedavg`` by examples, ``uniform``, ``median``, ``trimmed-mean``),
    optional update-norm clipping, the minimum of valid updates per round, and the dtype the
    broadcast and the uploads travel in. Taken from a ``RunConfig`` (``from_config``), which
    declares and checks every one of them: no second set of defaults here."""

    fraction: float
    per_round: int | None
    aggregation: str
    trim: float
    clip_norm: float | None
    min_clients: int
    wire_dtype: str

    @classmethod
    def from_config(cls, cfg) -> ServerSettings:
        """The server's settings of a RunConfig."""
        return cls(fraction=cfg.fraction, per_round=cfg.clients_per_round,
                   aggregation=cfg.aggregation, trim=cfg.trim, clip_norm=cfg.clip_norm,
                   min_clients=cfg.min_clients, wire_dtype=cfg.wire_dtype)


class Server:
    """Holds the server's state (``global_adapter``: the global adapter in PEFT key names for
    most methods, or what the method's ``fold`` keeps, e.g. FedALT's individual adapters) and
    the server-side timers. ``rule``: the run's method (``algorithms.Algorithm``), which says
    what each client is sent and how uploads fold into the state; default: FedIT's (one
    global adapter, the aggregation rule of ``settings``)."""

    def __init__(self, global_adapter: dict[str, torch.Tensor], client_names: list[str],
                 settings: ServerSettings, seed: int, rule: Algorithm | None = None):
        self.global_adapter = {k: v.detach().clone() for k, v in global_adapter.items()}
        self.client_names = list(client_names)
        self.settings, self.seed = settings, seed
        self.rule = rule if rule is not None else Algorithm(None)
        self.server_seconds = 0.0  # decode + validate + aggregate (+ checkpoint, by the runner)
        self.attempts = 0  # of the last round (a redone round samples again)

    def sample(self, round_index: int, attempt: int = 0) -> list[str]:
        """The clients of a round: a seeded draw from (seed, round, attempt), in name order."""
        n = len(self.client_names)
        k = self.settings.per_round or max(1, math.ceil(self.settings.fraction * n))
        k = min(k, n)
        rng = np.random.default_rng(derive_seed(self.seed, "sample", round_index, attempt))
        chosen = sorted(rng.choice(n, size=k, replace=False).tolist())
        return [self.client_names[i] for i in chosen]

    def expected(self) -> dict[str, torch.Tensor]:
        """The keys, shapes and dtypes every message of the run carries (the wire dtype)."""
        return wire.cast(self.rule.message_spec(self.global_adapter), self.settings.wire_dtype)

    def message(self, client: str) -> dict[str, torch.Tensor]:
        """What ``client`` is sent now, as it receives it (in the wire dtype)."""
        return wire.cast(self.rule.message(self.global_adapter, client, self.client_names),
                         self.settings.wire_dtype)

    def broadcasts(self, round_index: int, clients: list[str]) -> dict[str, bytes]:
        """{client: the blob it is sent for round ``round_index``}."""
        return {name: wire.encode(self.message(name), {"round": round_index, "client": "server",
                                                       "num_examples": 0})
                for name in clients}

    def aggregate_round(self, round_index: int, replies: dict[str, bytes | BaseException]):
        """Validates the replies and aggregates; returns (new global, accepted client names).

        Raises TooFewUpdates when fewer than ``min_clients`` replies are valid; the global
        adapter is then unchanged.
        """
        start = time.perf_counter()
        updates, counts = {}, {}
        expected = self.expected()
        for name, reply in replies.items():
            if isinstance(reply, BaseException):
                log.warning("round %d: client %s failed (%s: %s); left out",
                            round_index, name, type(reply).__name__, reply)
                continue
            try:
                tensors, meta = wire.decode(reply, expected, round=round_index,
                                            sender=name, max_bytes=MAX_BLOB_BYTES)
            except wire.WireError as exc:
                log.warning("round %d: blob from %s rejected (%s: %s); left out",
                            round_index, name, type(exc).__name__, exc)
                continue
            updates[name] = (self._rebased(tensors, name) if self.rule.uploads_update_message
                             else tensors)
            counts[name] = meta["num_examples"]
        try:
            if len(updates) < self.settings.min_clients:
                raise TooFewUpdates(f"round {round_index}: {len(updates)} valid updates, "
                                    f"min_clients is {self.settings.min_clients}")
            if self.settings.aggregation == "fedavg" and sum(counts.values()) == 0:
                raise TooFewUpdates(f"round {round_index}: the valid updates hold 0 examples")
            new = self.rule.fold(self.global_adapter, updates, counts, self.settings)
        finally:
            self.server_seconds += time.perf_counter() - start
        self.global_adapter = new
        return new, list(updates)

    def _rebased(self, upload: dict, client: str) -> dict:
        """A compressed upload as master + (upload - what ``client`` was sent), in the master's
        dtype: the update a client made is kept even where it is below the wire dtype's
        resolution (averaging the bf16 uploads themselves would round the master to bf16 every
        round). fp32 uploads are used as they are (the broadcast is the master itself), so the
        message is only rebuilt for a compressed wire."""
        if self.settings.wire_dtype == "fp32":
            return upload
        sent = self.message(client)
        return {k: (self.global_adapter[k].double() + upload[k].double() - sent[k].double())
                .to(self.global_adapter[k].dtype) for k in upload}

    def run_round(self, round_index: int, exchange, uploads: bool = True):
        """One round over any transport: sample, broadcast, ``exchange(round, sampled,
        broadcasts) -> (replies, stats)``, aggregate; redone with a new sample (up to
        ``MAX_ATTEMPTS``) while too few updates are valid. Returns
        (sampled, broadcasts, replies, stats, accepted)."""
        for attempt in range(MAX_ATTEMPTS):
            self.attempts = attempt + 1  # each attempt's uploads count for the DP account
            sampled = self.sample(round_index, attempt)
            broadcasts = self.broadcasts(round_index, sampled)
            replies, stats = exchange(round_index, sampled, broadcasts)
            if not uploads:
                return sampled, broadcasts, replies, stats, []
            try:
                _, accepted = self.aggregate_round(round_index, replies)
                return sampled, broadcasts, replies, stats, accepted
            except TooFewUpdates as exc:
                log.warning("%s; redoing the round", exc)
        raise RuntimeError(f"round {round_index}: too few valid updates after "
                           f"{MAX_ATTEMPTS} attempts")


def round_row(round_index: int, sampled, accepted, replies, broadcasts, stats) -> dict:
    """The metrics.jsonl line of a round (both transports write the same one); bytes are the
    largest blob of one client, each way."""
    row = {"round": round_index, "sampled": sampled, "accepted": accepted,
           "bytes_up_per_client": max((len(b) for b in replies.values()
                                       if isinstance(b, bytes)), default=0),
           "bytes_down": max((len(b) for b in broadcasts.values()), default=0)}
    for key in sorted({k for s in stats for k in s}):
        row[key] = sum(s[key] for s in stats if key in s) / len(stats)
    return row
