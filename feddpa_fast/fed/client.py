"""A federated client: receives the server's message as a blob (the global adapter for most
methods), trains its phases, keeps its local adapter (and what else its method keeps) in its
own state directory, and answers with a blob of what its method uploads.

In-process simulation shares one patched model between clients (one at a time): a client
loads the received global adapter and its own local adapter into it before training. Each
round's local adapter is written to ``<state_dir>/local_r<round>.safetensors`` (atomically);
the server's checkpoint says which rounds are committed, so a resumed run ignores (and
removes) files of rounds that were not.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch

from ..adapters import load_adapter_state_dict
from ..atomic import atomic_write_bytes
from ..sealed import IntegrityError, read_sealed, sealed_bytes
from . import wire
from .algorithms import Algorithm
from .checkpoint import CheckpointError, derive_seed
from .privacy import PrivacySettings, clip_and_noise
from .training import train_phase

__all__ = ["Client", "RoundStart", "TrainSettings"]

log = logging.getLogger("feddpa_fast.fed")
_LOCAL_FILE = re.compile(r"local_r(\d{4,})\.safetensors")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Local optimisation: AdamW per phase (re-created each phase, as the authors' per-round
    Trainer), ``local_epochs`` passes over the client's data, at most ``max_steps`` batches
    per epoch when set. Taken from a ``RunConfig`` (``from_config``), which declares and checks
    every one of them: no second set of defaults here."""

    local_epochs: int
    lr: float
    batch_size: int
    max_steps: int | None
    weight_decay: float = 0.0  # not a run option: the authors' AdamW has none

    @classmethod
    def from_config(cls, cfg) -> TrainSettings:
        """A client's local optimisation settings of a RunConfig."""
        return cls(local_epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                   max_steps=cfg.max_steps)


@dataclasses.dataclass(frozen=True)
class RoundStart:
    """A round of one client after ``begin_round``: the decoded message, the upload before
    training (DP's and a hostile client's base, else None), whether a hostile client's update
    is taken from it, and the round's phases."""

    received: dict
    before: dict | None
    own_base: bool
    phases: list


def _attacked(tensors, base, attack: str):
    """A hostile client's upload: its update (upload - base: what it received, or its own
    starting point when the upload is not its message updated) scaled by 1000 or negated."""
    factor = 1000.0 if attack == "scale" else -1.0
    return {k: (base[k].double() + factor * (v.double() - base[k].double())).to(v.dtype)
            for k, v in tensors.items()}


class Client:
    """One client (see the module docstring): its data, its state directory, and what its
    method (``algorithm``) does in a round."""

    def __init__(self, name: str, train, test, state_dir: str | Path, task,
                 algorithm: Algorithm, settings: TrainSettings, seed: int,
                 attack: str | None = None, wire_dtype: str = "fp32",
                 privacy: PrivacySettings | None = None):
        self.name, self.train, self.test = name, list(train), list(test)
        self.state_dir = Path(state_dir)
        self.task, self.algorithm, self.settings, self.seed = task, algorithm, settings, seed
        self.attack = attack  # robustness experiments only: "scale" | "signflip" | None
        self.wire_dtype, self.privacy = wire_dtype, privacy or PrivacySettings()
        # A method with a holdout keeps a seeded slice of the training data out of training.
        self.fit, self.holdout = self.train, []
        if algorithm.holdout > 0 and len(self.train) > 1:
            order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(
                derive_seed(seed, "holdout", name))).tolist()
            cut = max(1, int(round(algorithm.holdout * len(self.train))))
            self.holdout = [self.train[i] for i in order[:cut]]
            self.fit = [self.train[i] for i in order[cut:]]

    # ---- the local adapter on disk ---------------------------------------------------------
    def _local_files(self) -> dict[int, Path]:
        if not self.state_dir.is_dir():
            return {}
        found = {}
        for path in self.state_dir.iterdir():
            m = _LOCAL_FILE.fullmatch(path.name)
            if m:
                found[int(m.group(1))] = path
        return found

    def discard_uncommitted(self, rounds_done: int, post_done: bool = False) -> None:
        """Removes local adapters the checkpoint does not cover (a killed run's leftovers):
        those of rounds >= ``rounds_done``, except the post step's (index ``rounds_done``)
        once that step is done."""
        committed = rounds_done + (1 if post_done else 0)
        for r, path in self._local_files().items():
            if r >= committed:
                path.unlink()

    def load_local(self, before_round: int | None) -> None:
        """Puts the newest local adapter of a round < ``before_round`` (None: of any round)
        into the model, or a fresh seeded one."""
        files = {r: p for r, p in self._local_files().items()
                 if before_round is None or r < before_round}
        if not files:
            self.algorithm.init_local(self, derive_seed(self.seed, "local-init", self.name))
            return
        try:  # digest checked: a local adapter changed on disk is refused, named
            tensors, _ = read_sealed(files[max(files)], required=False)
        except IntegrityError as exc:
            raise CheckpointError(str(exc)) from None
        self.algorithm.load_local_tensors(self, tensors)

    def save_local(self, round_index: int) -> None:
        """The client's state after ``round_index`` (its method's ``local_tensors``), sealed
        and written atomically."""
        blob = sealed_bytes(self.algorithm.local_tensors(self), {"format": "pt"})
        atomic_write_bytes(self.state_dir / f"local_r{round_index:04d}.safetensors", blob)

    # ---- one round ---------------------------------------------------------------------------
    def run_round(self, broadcast: bytes, round_index: int, expected) -> tuple[bytes | None, dict]:
        """Decodes the server's blob, trains this round's phases; returns (reply blob, stats)."""
        start = self.begin_round(broadcast, round_index, expected)
        stats = {}
        for phase in start.phases:
            if phase.init_from_global:
                load_adapter_state_dict(self.task.model, start.received, "local")
            stats[f"loss_{phase.name}"] = train_phase(self, phase,
                                                      self.phase_seed(round_index, phase))
        return self.finish_round(start, round_index, stats)

    def phase_seed(self, round_index: int, phase) -> int:
        """The derived seed of one phase of this client: its data order and dropout."""
        return derive_seed(self.seed, round_index, self.name, phase.name)

    def begin_round(self, broadcast: bytes, round_index: int, expected) -> RoundStart:
        """Decodes the server's blob and loads the client's state into the model (the method's
        ``receive``); what a round's training starts from."""
        received, _ = wire.decode(broadcast, expected, round=round_index, sender="server")
        self.algorithm.receive(self, received, round_index)
        # DP clips the update of what is uploaded: its value after training minus before it
        # (the received global for most methods; FDLoRA's round 0: the fresh local adapter).
        # A hostile client's update is taken from there too where the upload is not the
        # message updated (FedALT's individual adapter).
        own_base = self.attack is not None and not self.algorithm.uploads_update_message
        before = (self.algorithm.upload(self, round_index)
                  if self.privacy.enabled or own_base else None)
        return RoundStart(received, before, own_base, self.algorithm.phases(round_index))

    def finish_round(self, start: RoundStart, round_index: int,
                     stats: dict) -> tuple[bytes | None, dict]:
        """After the phases, with the trained state in the model: saves the client's state,
        answers with its upload (clipped and noised under DP, corrupted when hostile)."""
        if any(p.train == "local" for p in start.phases):
            self.save_local(round_index)
        if not self.algorithm.uploads:
            return None, stats
        tensors = self.algorithm.upload(self, round_index)
        if self.privacy.enabled:  # clipped and noised by the client itself (fed/privacy.py)
            tensors = clip_and_noise(tensors, start.before, self.privacy,
                                     derive_seed(self.seed, round_index, self.name, "dp-noise"))
        if self.attack is not None:
            base = start.before if start.own_base else start.received
            tensors = _attacked(tensors, base, self.attack)
        reply = wire.encode(wire.cast(tensors, self.wire_dtype), {
            "round": round_index, "client": self.name, "num_examples": len(self.fit)})
        return reply, stats

    def post_train(self, broadcast: bytes, rounds: int, expected) -> dict:
        """The method's step after the last round, from the server's final blob."""
        return self.algorithm.post_train(self, self.begin_post(broadcast, rounds, expected),
                                         rounds)

    def begin_post(self, broadcast: bytes, rounds: int, expected) -> dict:
        """Decodes the server's final blob (what the post step starts from) and removes an
        interrupted attempt's leftovers."""
        received, _ = wire.decode(broadcast, expected, round=rounds, sender="server")
        self.discard_uncommitted(rounds)  # leftovers of an interrupted attempt at this step
        return received
