"""The algorithms of DESIGN section 4, as data: what each client trains in a round, what it
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
    train: str               # "global" | "local"
    weights: tuple[float, float]  # (global_w, local_w) during the phase


GLOBAL_ALONE = Phase("global", "global", (1.0, 0.0))
LOCAL_ALONE = Phase("local", "local", (0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    uploads: bool            # does the client send its global adapter each round?
    evaluation: str          # "global" | "local" | "dynamic"
    finetune_local: bool = False  # feddpa-f: a local phase after the last round
    local_mix: float = 0.5   # feddpa-t: the local weight a of the local phase

    def phases(self, round_index: int) -> list[Phase]:
        """What a client trains in round ``round_index`` (0-based), in order."""
        if self.name in ("fedit", "feddpa-f"):
            return [GLOBAL_ALONE]
        if self.name == "local":
            return [LOCAL_ALONE]
        if round_index == 0:  # feddpa-t: nothing to personalise against yet
            return [GLOBAL_ALONE]
        a = self.local_mix
        return [Phase("local", "local", (1.0 - a, a)), GLOBAL_ALONE]


ALGORITHMS = {
    "fedit": Algorithm("fedit", uploads=True, evaluation="global"),
    "local": Algorithm("local", uploads=False, evaluation="local"),
    "feddpa-f": Algorithm("feddpa-f", uploads=True, evaluation="dynamic", finetune_local=True),
    "feddpa-t": Algorithm("feddpa-t", uploads=True, evaluation="dynamic"),
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
