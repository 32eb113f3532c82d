"""The federated methods, one module each behind one protocol (``base.Algorithm``,
docs/ARCHITECTURE.md §4). Adding a method: a new module with an ``Algorithm`` subclass, and
one entry in ``ALGORITHMS``."""
from __future__ import annotations

from ..options import ConfigError
from .base import GLOBAL_ALONE, LOCAL_ALONE, Algorithm, Evaluation, Phase, TrainTarget
from .c2a import C2A
from .fdlora import FDLoRA
from .fedalt import FedALT
from .feddpa import FedDPAF, FedDPAT
from .fedit import FedIT
from .fedsa import FedSA
from .local import LocalOnly

__all__ = ["ALGORITHMS", "Algorithm", "Evaluation", "GLOBAL_ALONE", "LOCAL_ALONE", "Phase",
           "TrainTarget", "get_algorithm"]

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedIT, LocalOnly, FedDPAF, FedDPAT, FDLoRA, C2A, FedALT, FedSA)}


def get_algorithm(cfg) -> Algorithm:
    """The method of a RunConfig, instantiated for its run.

    Args:
        cfg: a ``RunConfig`` (its ``algo`` names the method).

    Returns:
        An ``Algorithm``.
    """
    if cfg.algo not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {cfg.algo!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[cfg.algo](cfg)
