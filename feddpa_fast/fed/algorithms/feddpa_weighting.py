"""FedDPA's instance-wise dynamic weighting (docs/ARCHITECTURE.md §4): per test instance, the
weights of the global and the local adapter from its similarity to k seeded local training
instances. Used by the evaluation of the FedDPA methods (``fed/algorithms/feddpa.py``).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..options import check_options, option

__all__ = ["WeightingConfig", "instance_weights", "represent_local", "similarity_scores",
           "weights_from_scores"]


@dataclasses.dataclass(frozen=True)
class WeightingConfig:
    """FedDPA's instance-wise dynamic weighting (inference only).

    ``assignment="authors"`` (the FedDPA code): global weight = ``cap * score``, local =
    1 - that. ``"opposite"``: local weight = ``cap * score``, global = 1 - that. The score is
    the reduced similarity of the instance to ``k`` seeded local training instances, clamped
    to [0, 1]; representations come from the last layer with the local adapter active.
    """

    k: int = option(5, "local training instances compared with (dynamic weighting)", minimum=1)
    similarity: str = option("cos", "similarity of representations", choices=("cos", "l2",
                                                                           "pearson"))
    reduction: str = option("mean", "reduction over the k anchors", choices=("mean", "max"))
    representation: str = option("last", "pooling of the last hidden state",
                                 choices=("last", "mean"))
    cap: float = option(0.5, "maximum weight of the scored adapter", minimum=0, maximum=1)
    assignment: str = option("authors", "authors (global = cap * score) or opposite "
                             "(local = cap * score)", choices=("authors", "opposite"))

    def __post_init__(self):
        check_options(self, prefix="weighting")


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


def represent_local(task, items, how: str, batch_size: int = 32, clients=None):
    """(N, H) representations of ``items`` with the local adapter alone, in batches;
    ``clients``: one client name per item (each row under its own client's local adapter,
    feddpa_fast.add_client), or None for the model's own local adapter."""
    from ...mixing import mix

    out = []
    for i in range(0, len(items), batch_size):
        batch_clients = None if clients is None else list(clients[i:i + batch_size])
        with mix(task.model, 0.0, 1.0, batch_clients):
            out.append(task.represent(items[i:i + batch_size], how))
    return torch.cat(out)


def weights_from_scores(score: torch.Tensor, cfg: WeightingConfig, assignment: str | None = None):
    """(global_w, local_w), each (N,) float32, from similarity scores: the scored adapter gets
    ``cap * score``, the other the rest (``assignment``: default ``cfg.assignment``)."""
    weighted = cfg.cap * score.float()
    if (assignment or cfg.assignment) == "authors":
        return weighted, 1.0 - weighted
    return 1.0 - weighted, weighted


def instance_weights(task, examples, anchors, cfg: WeightingConfig, batch_size: int = 32):
    """Per-example ``(global_w, local_w)`` tensors of shape (N,) for ``examples``.

    Representations of the examples and of the ``anchors`` (k local training instances) come
    from batched forwards with the local adapter alone; the weights are then one tensor per
    batch, so evaluation runs one forward per batch with a different mix per sequence.
    """
    score = similarity_scores(represent_local(task, examples, cfg.representation, batch_size),
                              represent_local(task, anchors, cfg.representation, batch_size),
                              cfg)
    return weights_from_scores(score, cfg)
