"""FedALT (Bian et al., AAAI 2026): each client trains its individual LoRA continuously and
mixes it per token, through a learned router, with a frozen Rest-of-World (RoW) LoRA: the
leave-one-out mean of the other clients' individual LoRAs.

On the dual-adapter layer (docs/trainer.md, "FedALT"):
- the RoW LoRA is the **global** adapter slot: received every round, frozen;
- the individual LoRA is the **local** slot: never reset to an average, kept in the client's
  state (``local_r<round>.safetensors``) with the routers;
- one router per patched layer, ``Linear(in_features, 2, bias=False)`` + an fp32 softmax over
  the layer's input (``feddpa_fast.route``), trained with the individual LoRA and kept on the
  client, as the reference code keeps it (``route_aggregation=False``).

The server keeps every client's latest individual LoRA and sends client c the unweighted mean
of the others', A and B averaged separately (the reference's server). A client that has not
uploaded yet counts as the shared seeded init, whose B is zero; in round 0 every RoW is that
init, so it adds nothing and the router still splits each token's weight. Clients upload their
individual LoRA. Evaluation: the router decides per token (no similarity weighting).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from ...adapters import adapter_state_dict, load_adapter_state_dict
from ...atomic import atomic_write_bytes
from ...mixing import set_trainable
from ...routing import LayerRouters, route
from ..checkpoint import derive_seed
from ..options import ConfigError
from ..training import init_adapter
from .base import Algorithm, Evaluation, Phase, TrainTarget
from .cohort_member import AdapterMember, MemberTarget

__all__ = ["FedALT", "rest_of_world"]

_INIT = "init/"      # the shared seeded init, for clients that have not uploaded yet
_CLIENT = "client/"  # client/<name>/<PEFT key>: a client's latest individual LoRA
_ROUTER = ".router.weight"
# Both branches at full weight: the router's softmax is the whole mix.
_ROUTED = (1.0, 1.0)


def _client_key(name: str, key: str) -> str:
    return f"{_CLIENT}{name}/{key}"


def rest_of_world(state: dict[str, torch.Tensor], client: str,
                  clients: list[str]) -> dict[str, torch.Tensor]:
    """The unweighted mean over ``clients`` other than ``client`` of their latest individual
    LoRAs in the server's ``state`` (the init for one that has none), key by key, in fp64 then
    the state's dtype; the init alone when ``client`` is the only one."""
    others = [c for c in clients if c != client]
    rest = {}
    for init_key, init in ((k, v) for k, v in state.items() if k.startswith(_INIT)):
        key = init_key[len(_INIT):]
        if not others:
            rest[key] = init.clone()
            continue
        total = sum(state.get(_client_key(c, key), init).double() for c in others)
        rest[key] = (total / len(others)).to(init.dtype)
    return rest


class FedALT(Algorithm):
    name = "fedalt"
    uploads_update_message = False  # an upload is the client's own LoRA, not the RoW updated
    personal_messages = True        # each client its own RoW

    def __init__(self, cfg):
        super().__init__(cfg)
        self.routers: LayerRouters | None = None  # the shared model's; loaded per client

    @classmethod
    def check_config(cls, cfg) -> None:
        """The RoW is the reference's unweighted leave-one-out mean: no other aggregation; and
        no client-level DP: an upload is the client's whole adapter, built on earlier rounds
        that were never released, so one upload's sensitivity is not the clip bound."""
        if cfg.aggregation != "uniform" or cfg.clip_norm is not None:
            raise ConfigError("--algo fedalt: the Rest-of-World adapter is the unweighted "
                              "leave-one-out mean of the other clients' adapters; use "
                              "--aggregation uniform and no --clip-norm")
        if cfg.dp_clip is not None:
            raise ConfigError("--algo fedalt: client-level DP (--dp-clip) is not supported: an "
                              "upload is the client's whole individual adapter, which holds "
                              "every earlier round's unreleased training, so the DP account "
                              "of one clipped update per round does not hold")

    # ---- the server ------------------------------------------------------------------------
    def initial_global(self, task):
        init_adapter(task.model, "global", derive_seed(self.cfg.seed, "global-init"))
        return {_INIT + k: v for k, v in adapter_state_dict(task.model, "global").items()}

    def message_spec(self, state):
        return {k[len(_INIT):]: v for k, v in state.items() if k.startswith(_INIT)}

    def message(self, state, client, clients):
        return rest_of_world(state, client, clients)

    def fold(self, state, uploads, counts, settings):
        """Each uploading client's entry replaced by its upload (widened to fp32)."""
        new = dict(state)
        for name, tensors in uploads.items():
            for key, value in tensors.items():
                new[_client_key(name, key)] = value.to(state[_INIT + key].dtype)
        return new

    # ---- a client's own state: the individual LoRA and the routers -------------------------
    def join(self, task, client, shared, report) -> None:
        if self.routers is None:
            self.routers = LayerRouters(task.model)

    def local_tensors(self, client):
        return {**adapter_state_dict(client.task.model, "local"), **self.routers.tensors()}

    def load_local_tensors(self, client, tensors) -> None:
        self.routers.load_tensors({k: v for k, v in tensors.items() if k.endswith(_ROUTER)})
        load_adapter_state_dict(client.task.model, {k: v for k, v in tensors.items()
                                                    if not k.endswith(_ROUTER)}, "local")

    def init_local(self, client, seed: int) -> None:
        super().init_local(client, seed)
        self.routers.reset(derive_seed(seed, "router"))

    # ---- a round ---------------------------------------------------------------------------
    def phases(self, round_index: int) -> list[Phase]:
        return [Phase("individual", "local", _ROUTED)]

    def train_target(self, client, phase: Phase) -> TrainTarget:
        """The individual LoRA and the routers, under the routed mix (the RoW frozen)."""
        model = client.task.model
        set_trainable(model, "local")
        params = [p for p in model.parameters() if p.requires_grad]
        return TrainTarget(params + list(self.routers.parameters()),
                           lambda: route(model, self.routers), modules=(self.routers,))

    def cohort_member(self, client):
        """The client's adapters and a copy of its routers (loaded by ``receive``)."""
        return RoutedMember(client, self.routers)

    def upload(self, client, round_index: int):
        """The individual LoRA (the routers stay on the client)."""
        return adapter_state_dict(client.task.model, "local")

    # ---- evaluation and outputs ------------------------------------------------------------
    def final_evaluation(self, client) -> Evaluation:
        return Evaluation(_ROUTED, context=lambda: route(client.task.model, self.routers))

    def save_client_outputs(self, client, out: Path) -> None:
        """The individual LoRA in PEFT format, and the routers beside it
        (``adapters/<client>/router.safetensors``)."""
        super().save_client_outputs(client, out)
        atomic_write_bytes(out / "adapters" / client.name / "router.safetensors",
                           st_save(self.routers.tensors(), metadata={"format": "pt"}))

    def save_global_outputs(self, task, tensors, out: Path) -> None:
        """Nothing: there is no global adapter (each client's RoW is the server's
        ``rest_of_world`` of the checkpointed state)."""


class RoutedMember(AdapterMember):
    """FedALT in a cohort: the individual LoRA and the client's own routers train; the rows
    are mixed per token by the client's routers (``feddpa_fast.client_adapters``)."""

    def __init__(self, client, routers: LayerRouters):
        super().__init__(client)
        self.shared = routers
        self.router = copy.deepcopy(routers)

    def start_phase(self, phase: Phase) -> MemberTarget:
        target = super().start_phase(phase)
        return MemberTarget(target.params + list(self.router.parameters()), (self.router,))

    def adapters(self):
        return dataclasses.replace(super().adapters(), router=self.router)

    def finish(self) -> None:
        super().finish()
        self.shared.load_state_dict(self.router.state_dict())
