"""FDLoRA's fusion-weight search: per client, the weights (w_global, w_personal) of the two
adapters that minimise the loss on a held-out slice of the client's training data.

Gradient-free and bounded, with a fixed evaluation budget: first the three anchors (global
alone (1, 0), personal alone (0, 1), their sum (1, 1)), then Nelder-Mead (scipy) started from
the best anchor, every point clipped into [low, high]^2. The budget counts every loss
evaluation and is never exceeded; the result is the best point evaluated, so it is never worse
on the held-out slice than either adapter alone.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize

from ...mixing import mix

__all__ = ["SearchConfig", "fusion_search", "holdout_loss"]


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    budget: int = 16        # loss evaluations per client, anchors included
    low: float = 0.0
    high: float = 1.5

    def __post_init__(self):
        if self.budget < 3 or not self.low < self.high:
            raise ValueError(f"search needs budget >= 3 and low < high, got {self}")


class _BudgetExhausted(Exception):
    pass


def fusion_search(objective: Callable[[float, float], float], cfg: SearchConfig = SearchConfig()):
    """Minimises ``objective(w_global, w_personal)``; returns (best weights, best value,
    every (weights, value) evaluated, in order)."""
    evaluations: list[tuple[tuple[float, float], float]] = []

    def evaluate(point) -> float:
        if len(evaluations) >= cfg.budget:
            raise _BudgetExhausted
        w = tuple(float(v) for v in np.clip(point, cfg.low, cfg.high))
        value = float(objective(*w))
        evaluations.append((w, value if np.isfinite(value) else float("inf")))
        return evaluations[-1][1]

    for anchor in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        evaluate(anchor)
    start = np.array(min(evaluations, key=lambda e: e[1])[0])
    step = 0.25 * (cfg.high - cfg.low)
    simplex = np.stack([start, start + [step, 0.0], start + [0.0, step]])
    try:
        minimize(lambda p: evaluate(p), start, method="Nelder-Mead",
                 options={"maxfev": cfg.budget - len(evaluations), "initial_simplex": simplex,
                          "xatol": 1e-3, "fatol": 1e-4})
    except _BudgetExhausted:
        pass
    best, value = min(evaluations, key=lambda e: e[1])
    return best, value, evaluations


@torch.no_grad()
def holdout_loss(task, examples, global_w: float, personal_w: float, batch_size: int = 32) -> float:
    """Mean training loss of ``examples`` under the mix (eval mode, no dropout)."""
    task.model.eval()
    total, count = 0.0, 0
    with mix(task.model, global_w, personal_w):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            total += float(task.loss(chunk)) * len(chunk)
            count += len(chunk)
    return total / max(count, 1)
