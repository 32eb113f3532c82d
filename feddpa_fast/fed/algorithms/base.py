"""The protocol every method implements (docs/ARCHITECTURE.md §4).

A method is one ``Algorithm`` subclass in its own module of this package, registered in
``__init__.py``. The client, the run and the Flower apps call only these hooks, never a
method's name:

    the run        setup_report (client), setup (server), join (client), initial_global,
                   post_step, keeps_local, save_global_outputs
    the server     message_spec, message, fold (uploads_update_message, personal_messages)
    client state   local_tensors, load_local_tensors, init_local
    a round        phases, receive, train_target, upload; cohort_member (fed/cohort.py)
    after it       post_train (when post_step is set)
    evaluation     round_evaluation, final_evaluation, client_report, save_client_outputs

The defaults are FedIT-like: the server's state is the global adapter, sent to every client and
aggregated by the run's rule; a client's state is its local adapter; each phase trains one
adapter of the patched model under a fixed mix.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from ...adapters import adapter_state_dict, load_adapter_state_dict, save_adapter
from ...mixing import mix, set_trainable
from ..aggregate import aggregate
from ..checkpoint import derive_seed
from ..training import init_adapter
from .cohort_member import AdapterMember

__all__ = ["Algorithm", "Evaluation", "GLOBAL_ALONE", "LOCAL_ALONE", "Phase", "TrainTarget"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of local training: which adapter learns, under which fixed mix."""

    name: str                       # also a label of the phase's derived seed
    train: str                      # "global" | "local" (or a method's own, see train_target)
    weights: tuple[float, float]    # (global_w, local_w) during the phase
    init_from_global: bool = False  # copy the received global adapter into the local first


GLOBAL_ALONE = Phase("global", "global", (1.0, 0.0))
LOCAL_ALONE = Phase("local", "local", (0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class TrainTarget:
    """What a phase optimises: the parameters, the context entered around each batch's
    forward and backward, and modules (besides the model) put in training mode."""

    params: list[torch.nn.Parameter]
    batch_context: Callable[[], contextlib.AbstractContextManager]
    modules: tuple[torch.nn.Module, ...] = ()


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How a client's model answers its test instances.

    ``mode``: "global" / "local" (one adapter alone), "dynamic" (FedDPA's instance-wise mix)
    or a fixed (global_w, local_w). ``context`` (optional) is entered around the scoring.
    ``client_independent``: every client's model is the same, so its scores are computed once.
    """

    mode: str | tuple[float, float]
    context: Callable[[], contextlib.AbstractContextManager] | None = None
    client_independent: bool = False


class Algorithm:
    """The base of every method; one instance per run (or per Flower app)."""

    name: ClassVar[str]
    uploads: ClassVar[bool] = True          # does a client send something each round?
    holdout: ClassVar[float] = 0.0          # fraction of a client's data kept out of training
    post_step: ClassVar[str | None] = None  # label of the step after the last round, if any
    # A post step that is one training phase (FedDPA-F's fine-tuning), started by
    # ``prepare_post``: a cohort (fed/cohort.py) runs it for its clients side by side. None:
    # ``post_train``, one client at a time.
    post_phase: ClassVar[Phase | None] = None
    # A method whose rounds are this one's, bit for bit (same phases, uploads and seeds):
    # compare reuses them (fed/reuse.py).
    shares_rounds_with: ClassVar[str | None] = None

    def __init__(self, cfg):
        self.cfg = cfg  # the run's RunConfig

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raises ConfigError for run options the method cannot honour (RunConfig calls it
        when the config is made; nothing by default)."""

    # ---- the run ---------------------------------------------------------------------------
    def setup_report(self, task, client) -> dict | None:
        """What a client tells the server before round 0 (JSON-able; nothing by default)."""
        return None

    def setup(self, task, reports: dict[str, dict | None]) -> dict:
        """Server side, from every client's report: per-run state; returns what every client
        is told back (JSON-able; nothing by default)."""
        return {}

    def join(self, task, client, shared: dict, report: dict | None) -> None:
        """Client side: what the client builds from the setup's ``shared`` result and its own
        ``report`` (nothing by default)."""

    def initial_global(self, task) -> dict[str, torch.Tensor]:
        """What the server starts from: a seeded PEFT-initialised global adapter."""

        init_adapter(task.model, "global", derive_seed(self.cfg.seed, "global-init"))
        return adapter_state_dict(task.model, "global")

    # ---- the server ------------------------------------------------------------------------
    # Whether an upload is what the client was sent plus its update, so that a compressed
    # upload is rebased on the server's fp32 master (server.py); a method whose uploads are
    # the clients' own adapters (FedALT) sets False.
    uploads_update_message: ClassVar[bool] = True
    # Whether ``message`` differs between clients (FedALT): such a method's clients cannot
    # share one global adapter in the client bank (fed/client_pool.py).
    personal_messages: ClassVar[bool] = False

    def message_spec(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors with the keys, shapes and dtypes of every message of the run, both ways
        (by default the server's state itself: the global adapter)."""
        return state

    def message(self, state: dict[str, torch.Tensor], client: str,
                clients: list[str]) -> dict[str, torch.Tensor]:
        """What the server sends ``client`` (one of the run's ``clients``) from its state: the
        global adapter, the same for everyone, by default."""
        return state

    def fold(self, state: dict[str, torch.Tensor], uploads: dict[str, dict],
             counts: dict[str, int], settings) -> dict[str, torch.Tensor]:
        """The server's next state from the round's valid ``uploads`` ({client: tensors}, in
        the state's dtype where they were rebased) and example ``counts``: the aggregation
        rule of ``settings`` (a ``ServerSettings``) by default."""
        return aggregate(settings.aggregation, state, list(uploads.values()),
                         [counts[n] for n in uploads], trim=settings.trim,
                         clip_norm=settings.clip_norm)

    # ---- a client's own state --------------------------------------------------------------
    def local_tensors(self, client) -> dict[str, torch.Tensor]:
        """What a client keeps between rounds (``local_r<round>.safetensors``): its local
        adapter by default."""
        return adapter_state_dict(client.task.model, "local")

    def load_local_tensors(self, client, tensors: dict[str, torch.Tensor]) -> None:
        """Puts what ``local_tensors`` gave back into the client's model."""
        load_adapter_state_dict(client.task.model, tensors, "local")

    def init_local(self, client, seed: int) -> None:
        """A client's state before it has any: a seeded PEFT-initialised local adapter."""
        init_adapter(client.task.model, "local", seed)

    def keeps_local(self, rounds: int) -> bool:
        """Whether clients end the run with a local adapter worth saving."""
        return any(p.train == "local" for r in range(rounds) for p in self.phases(r))

    # ---- a client's round ------------------------------------------------------------------
    def phases(self, round_index: int) -> list[Phase]:
        """What a client trains in round ``round_index`` (0-based), in order."""
        return [GLOBAL_ALONE]

    def receive(self, client, tensors: dict[str, torch.Tensor], before_round: int | None) -> None:
        """Loads what the server sent, plus the client's newest local adapter of a round
        < ``before_round`` (None: of any committed round)."""
        load_adapter_state_dict(client.task.model, tensors, "global")
        client.load_local(before_round)

    def train_target(self, client, phase: Phase) -> TrainTarget:
        """The parameters of ``phase.train`` and its fixed mix."""
        model = client.task.model
        set_trainable(model, phase.train)
        params = [p for p in model.parameters() if p.requires_grad]
        return TrainTarget(params, lambda: mix(model, *phase.weights))

    def upload(self, client, round_index: int) -> dict[str, torch.Tensor]:
        """What a client sends after ``round_index``: its global adapter."""
        return adapter_state_dict(client.task.model, "global")

    def cohort_member(self, client):
        """The client's part in a cohort (fed/cohort.py), made right after its ``receive``: a
        copy of what ``train_target`` would train, trained beside the other clients'
        (algorithms/cohort_member.py). The default: the global and local adapters under the
        phase's fixed mix."""
        return AdapterMember(client)

    # ---- after the last round --------------------------------------------------------------
    def prepare_post(self, client, tensors: dict[str, torch.Tensor], rounds: int) -> None:
        """Loads what ``post_phase`` trains from (only when ``post_phase`` is set)."""
        raise NotImplementedError(f"{self.name} has no post-training phase")

    def post_train(self, client, tensors: dict[str, torch.Tensor], rounds: int) -> dict:
        """The step after the last round on one client (only when ``post_step`` is set);
        returns its stats."""
        raise NotImplementedError(f"{self.name} has no post-training step")

    # ---- evaluation ------------------------------------------------------------------------
    def final_evaluation(self, client) -> Evaluation:
        """How the client's final model answers (P and TTP)."""
        raise NotImplementedError

    def round_evaluation(self, client) -> Evaluation:
        """How the client's model answers after a round (P only); the final one by default."""
        return self.final_evaluation(client)

    def client_report(self, client) -> dict:
        """Extra per-client entries of results.json (nothing by default)."""
        return {}

    def save_client_outputs(self, client, out: Path) -> None:
        """The client's final local adapter in PEFT format, when the method keeps one."""
        if self.keeps_local(self.cfg.rounds):
            save_adapter(client.task.model, out / "adapters" / client.name / "local",
                         adapter="local")

    def save_global_outputs(self, task, tensors: dict[str, torch.Tensor], out: Path) -> None:
        """The final global adapter in PEFT format, when the method federates one."""
        if self.uploads:
            load_adapter_state_dict(task.model, tensors, "global")
            save_adapter(task.model, out / "adapters" / "global", adapter="global")
