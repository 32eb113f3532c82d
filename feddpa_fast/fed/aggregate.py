"""Server-side aggregation rules over client adapters (docs/ARCHITECTURE.md §3).

Each update is a dict name -> tensor with the keys and shapes of the global adapter (wire.decode
has checked that). The rules work in float64 and return tensors in the global adapter's dtype:

- ``fedavg``: weighted mean, weights = the clients' example counts, or uniform;
- ``median``: coordinate-wise median (for an even count, the mean of the two middle values);
- ``trimmed_mean``: per coordinate, drop the ``trim`` fraction of highest and of lowest values
  (``floor(trim * n)`` each side), average the rest;
- ``clip_updates``: scales each client's *update* (client - global) down to an L2 norm of at
  most ``max_norm`` over all its tensors, before any rule (norm clipping).
"""
from __future__ import annotations

import math

import torch

__all__ = ["RULES", "aggregate", "clip_updates", "fedavg", "median", "trimmed_mean"]

RULES = ("fedavg", "uniform", "median", "trimmed-mean")
Adapter = dict[str, torch.Tensor]


def _stack(updates: list[Adapter], key: str) -> torch.Tensor:
    return torch.stack([u[key].to(torch.float64) for u in updates])


def _check(updates: list[Adapter]) -> None:
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    keys = set(updates[0])
    if any(set(u) != keys for u in updates):
        raise ValueError("updates have different key sets")


def fedavg(updates: list[Adapter], weights: list[float] | None = None) -> Adapter:
    """Weighted mean (uniform when ``weights`` is None)."""
    _check(updates)
    if weights is None:
        weights = [1.0] * len(updates)
    if len(weights) != len(updates) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fedavg weights must be non-negative with a positive sum, got {weights}")
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key, ref in updates[0].items():
        stacked = _stack(updates, key)
        out[key] = torch.tensordot(w, stacked, dims=1).to(ref.dtype)
    return out


def median(updates: list[Adapter]) -> Adapter:
    """Coordinate-wise median; mean of the two middle values for an even count."""
    _check(updates)
    out = {}
    for key, ref in updates[0].items():
        s = _stack(updates, key).sort(dim=0).values
        n = s.shape[0]
        mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        out[key] = mid.to(ref.dtype)
    return out


def trimmed_mean(updates: list[Adapter], trim: float = 0.1) -> Adapter:
    """Per coordinate, the mean after dropping floor(trim * n) values at each end."""
    _check(updates)
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    n = len(updates)
    cut = math.floor(trim * n)
    out = {}
    for key, ref in updates[0].items():
        s = _stack(updates, key).sort(dim=0).values
        out[key] = s[cut:n - cut].mean(0).to(ref.dtype)
    return out


def clip_updates(global_adapter: Adapter, updates: list[Adapter], max_norm: float) -> list[Adapter]:
    """Each update's delta from ``global_adapter`` scaled to an L2 norm <= ``max_norm``."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    clipped = []
    for u in updates:
        deltas = {k: u[k].to(torch.float64) - global_adapter[k].to(torch.float64) for k in u}
        norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
        factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
        clipped.append({k: (global_adapter[k].to(torch.float64) + deltas[k] * factor)
                        .to(u[k].dtype) for k in u})
    return clipped


def aggregate(rule: str, global_adapter: Adapter, updates: list[Adapter],
              num_examples: list[int], *, trim: float = 0.1,
              clip_norm: float | None = None) -> Adapter:
    """Applies optional norm clipping, then ``rule`` (one of ``RULES``)."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation {rule!r}; choose one of {RULES}")
    # Updates that travelled in bf16 / fp16 widen exactly to the global adapter's dtype, so the
    # rules (fp64 inside) return that dtype; fp32 updates are left as they are.
    updates = [{k: v.to(global_adapter[k].dtype) for k, v in u.items()} for u in updates]
    if clip_norm is not None:
        updates = clip_updates(global_adapter, updates, clip_norm)
    if rule == "fedavg":
        return fedavg(updates, [float(n) for n in num_examples])
    if rule == "uniform":
        return fedavg(updates)
    if rule == "median":
        return median(updates)
    return trimmed_mean(updates, trim)
