"""The algorithms of docs/DESIGN.md §4, as data: what each client trains in a round, what it
uploads, how it is evaluated; and FedDPA's instance-wise dynamic weighting.

    fedit     each round: train the global adapter alone (mix 1, 0) from the received global;
              upload it. Evaluated with the global adapter alone.
    local     each round: train the local adapter alone (mix 0, 1); nothing is uploaded.
              Evaluated with the local adapter alone.
    feddpa-f  FedIT for every round, then each client fine-tunes a local adapter initialised
              from the final global one (mix 0, 1). Evaluated with the dynamic mix.
    feddpa-t  round 0: the global phase only. Later rounds: first the local adapter, with the
              received global mixed in but frozen (local weight a = 0.5, global 1 - a), then
              the global adapter alone from the received global; upload the global adapter.
              Evaluated with the dynamic mix.
    fdlora    round 0: each client trains its personalized (local) adapter alone and uploads
              it once; their average initialises the global adapter. Later rounds: the global
              adapter alone, uploaded and averaged; every ``sync_every`` rounds the personalized
              adapter is first re-synced (restarted from the received global adapter and
              trained locally). After the last round, per-client fusion weights
              (w_global, w_personal) from a bounded Nelder-Mead search on a held-out slice of
              the client's training data (fed/fdlora.py); evaluated with those weights.
    c2a       a hypernetwork (fed/c2a.py), shared and averaged, generates each client's LoRA
              factors from its label distribution, its mean context embedding and a layer
              embedding; only the hypernetwork travels. Evaluated with the factors generated
              from a uniform label distribution, as in the method.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

__all__ = ["ALGORITHMS", "Phase", "Algorithm", "WeightingConfig", "get_algorithm",
           "instance_weights", "similarity_scores"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of local training: which adapter learns, under which fixed mix."""

    name: str
    train: str                    # "global" | "local" | "hyper" (C2A's hypernetwork)
    weights: tuple[float, float]  # (global_w, local_w) during the phase
    init_from_global: bool = False  # copy the received global adapter into the local first


GLOBAL_ALONE = Phase("global", "global", (1.0, 0.0))
LOCAL_ALONE = Phase("local", "local", (0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    uploads: bool            # does the client send something each round?
    evaluation: str          # "global" | "local" | "dynamic" | "fused" | "generated"
    post: str | None = None  # after the last round: "finetune" (feddpa-f), "search" (fdlora)
    local_mix: float = 0.5   # feddpa-t: the local weight a of the local phase
    sync_every: int = 2      # fdlora: rounds between re-syncs of the personalized adapter
    holdout: float = 0.0     # fdlora: fraction of a client's training data kept for the search

    @property
    def finetune_local(self) -> bool:
        return self.post == "finetune"

    def phases(self, round_index: int) -> list[Phase]:
        """What a client trains in round ``round_index`` (0-based), in order."""
        if self.name in ("fedit", "feddpa-f"):
            return [GLOBAL_ALONE]
        if self.name == "local":
            return [LOCAL_ALONE]
        if self.name == "c2a":
            return [Phase("hyper", "hyper", (0.0, 0.0))]
        if self.name == "fdlora":
            if round_index == 0:  # the personalized adapter, trained locally first
                return [Phase("personal", "local", (0.0, 1.0))]
            if round_index % self.sync_every == 0:  # re-sync: restart it from the global one
                return [Phase("resync", "local", (0.0, 1.0), init_from_global=True),
                        GLOBAL_ALONE]
            return [GLOBAL_ALONE]
        if round_index == 0:  # feddpa-t: nothing to personalise against yet
            return [GLOBAL_ALONE]
        a = self.local_mix
        return [Phase("local", "local", (1.0 - a, a)), GLOBAL_ALONE]

    def upload_adapter(self, round_index: int) -> str:
        """Which adapter a client sends: FDLoRA's round 0 sends the personalized adapters,
        whose average initialises the global one (the method's only local upload); C2A
        sends its hypernetwork ("hyper"); everything else the global adapter."""
        if self.name == "fdlora" and round_index == 0:
            return "local"
        return "hyper" if self.name == "c2a" else "global"


ALGORITHMS = {
    "fedit": Algorithm("fedit", uploads=True, evaluation="global"),
    "local": Algorithm("local", uploads=False, evaluation="local"),
    "feddpa-f": Algorithm("feddpa-f", uploads=True, evaluation="dynamic", post="finetune"),
    "feddpa-t": Algorithm("feddpa-t", uploads=True, evaluation="dynamic"),
    "fdlora": Algorithm("fdlora", uploads=True, evaluation="fused", post="search", holdout=0.2),
    "c2a": Algorithm("c2a", uploads=True, evaluation="generated"),
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


@dataclasses.dataclass(frozen=True)
class WeightingConfig:
    """FedDPA's instance-wise dynamic weighting (inference only).

    ``assignment="authors"`` (the FedDPA code): global weight = ``cap * score``, local =
    1 - that. ``"opposite"``: local weight = ``cap * score``, global = 1 - that. The score is
    the reduced similarity of the instance to ``k`` seeded local training instances, clamped
    to [0, 1]; representations come from the last layer with the local adapter active.
    """

    k: int = 5
    similarity: str = "cos"        # cos | l2 | pearson
    reduction: str = "mean"        # mean | max
    representation: str = "last"   # last | mean
    cap: float = 0.5
    assignment: str = "authors"    # authors | opposite

    def __post_init__(self):
        checks = {"similarity": ("cos", "l2", "pearson"), "reduction": ("mean", "max"),
                  "representation": ("last", "mean"), "assignment": ("authors", "opposite")}
        for field, allowed in checks.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"weighting {field} must be one of {allowed}, "
                                 f"got {getattr(self, field)!r}")
        if self.k < 1 or not 0 <= self.cap <= 1:
            raise ValueError(f"weighting needs k >= 1 and cap in [0, 1], got {self.k}, {self.cap}")


def similarity_scores(reps: torch.Tensor, anchors: torch.Tensor, cfg: WeightingConfig):
    """(N, H) x (k, H) -> (N,) scores in [0, 1]."""
    reps, anchors = reps.double(), anchors.double()
    if cfg.similarity == "pearson":  # cosine of the centred vectors
        reps = reps - reps.mean(-1, keepdim=True)
        anchors = anchors - anchors.mean(-1, keepdim=True)
    if cfg.similarity == "l2":
        sims = 1.0 / (1.0 + torch.cdist(reps, anchors))  # distance 0 -> 1, far -> 0
    else:
        sims = F.normalize(reps, dim=-1) @ F.normalize(anchors, dim=-1).T
    score = sims.mean(1) if cfg.reduction == "mean" else sims.max(1).values
    return score.clamp(0.0, 1.0)


def instance_weights(task, examples, anchors, cfg: WeightingConfig, batch_size: int = 32):
    """Per-example ``(global_w, local_w)`` tensors of shape (N,) for ``examples``.

    Representations of the examples and of the ``anchors`` (k local training instances) come
    from batched forwards with the local adapter alone; the weights are then one tensor per
    batch, so evaluation runs one forward per batch with a different mix per sequence.
    """
    from ..mixing import mix

    def represent(items):
        out = []
        with mix(task.model, 0.0, 1.0):
            for i in range(0, len(items), batch_size):
                out.append(task.represent(items[i:i + batch_size], cfg.representation))
        return torch.cat(out)

    score = similarity_scores(represent(examples), represent(anchors), cfg).float()
    weighted = cfg.cap * score
    if cfg.assignment == "authors":
        return weighted, 1.0 - weighted
    return 1.0 - weighted, weighted
