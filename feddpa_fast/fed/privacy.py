"""Client-level differential privacy for what a client uploads (docs/ARCHITECTURE.md §3).

Each sampled client clips its update (upload - received global, over all tensors) to an L2
norm of at most C and adds Gaussian noise N(0, sigma^2 C^2) to every coordinate before
encoding: the noise is added by each client (local / distributed DP), so no party, the server
included, sees an unnoised update. The noise is drawn from a generator seeded by the run's
derived seeds, so a resumed run adds the same noise.

The privacy spent is tracked by opacus' RDP accountant, one step per round at noise
multiplier sigma and sampling rate q = sampled / clients. This counts the aggregate as if the
noise were the server's single N(0, sigma^2 C^2) on the sum, the standard DP-FedAvg account;
the sum actually carries one draw per client, so the reported epsilon is an upper bound.
Not covered (docs/trainer.md, "Compressed wire and client-level DP"): the server knows the sample
(against it, q = 1 applies), the sample has a fixed size (the RDP account assumes Poisson),
and the unnoised side channels (losses in the replies, C2A's setup report, FDLoRA's held-out
losses).
"""
from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["PrivacySettings", "clip_and_noise", "epsilon"]


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
    """``clip`` C (None: no DP), ``noise_multiplier`` sigma and the target ``delta``."""

    clip: float | None = None
    noise_multiplier: float = 0.0
    delta: float = 1e-5

    @property
    def enabled(self) -> bool:
        return self.clip is not None


def clip_and_noise(upload: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
                   settings: PrivacySettings, seed: int) -> dict[str, torch.Tensor]:
    """``received + clip(upload - received) + N(0, sigma^2 C^2)``, in fp64, cast back.

    Args:
        upload: what the client would send (same keys and shapes as ``received``).
        received: the same state before the round's training (the client's starting point).
        settings: C and sigma.
        seed: the noise generator's seed (derived from the run seed, round and client).

    Returns:
        The privatised upload, in the upload's dtypes.
    """
    keys = sorted(upload)
    deltas = {k: upload[k].double() - received[k].double() for k in keys}
    norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
    factor = min(1.0, settings.clip / norm) if norm > 0 else 1.0
    gen = torch.Generator().manual_seed(seed)
    std = settings.noise_multiplier * settings.clip
    out = {}
    for k in keys:
        noise = torch.randn(deltas[k].shape, generator=gen, dtype=torch.float64) * std
        out[k] = (received[k].double() + deltas[k] * factor + noise).to(upload[k].dtype)
    return out


def epsilon(settings: PrivacySettings, sample_rates: list[float]) -> float:
    """The (epsilon, delta) epsilon after one round per entry of ``sample_rates``
    (opacus' RDP accountant); ``inf`` without noise."""
    if settings.noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for q in sample_rates:
        accountant.step(noise_multiplier=settings.noise_multiplier, sample_rate=q)
    return float(accountant.get_epsilon(settings.delta))
