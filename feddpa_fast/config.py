"""``DualLoRAConfig``: what ``patch`` builds (docs/ARCHITECTURE.md §2)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["ADAPTERS", "DualLoRAConfig"]

# The two branches every patched layer holds, in the order they are stacked in the op's
# lora_a rows / lora_b columns: [0:r) global, [r:2r) local.
ADAPTERS = ("global", "local")

TargetSpec = str | Sequence[str]


@dataclasses.dataclass(frozen=True)
class DualLoRAConfig:
    """Rank, scaling, dropout and targets of the two adapters (the authors' defaults).

    ``target_modules``: a list of module-name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``), a string that is a full-match regex over module
    names, or ``"all-linear"`` (every ``nn.Linear`` / GPT-2 ``Conv1D`` except the LM head).
    ``exclude``: suffixes (or one full-match regex) removed from the matches.
    Both adapters get rank ``r`` and ``scaling = alpha / r``.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: TargetSpec = ("q_proj", "v_proj")
    exclude: TargetSpec = ()

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"DualLoRAConfig.r must be a positive int, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"DualLoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DualLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for field in ("target_modules", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str):
                continue
            if not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"DualLoRAConfig.{field} must be a string or a sequence of "
                                f"non-empty strings, got {value!r}")
            object.__setattr__(self, field, tuple(value))
        if not self.target_modules:
            raise ValueError("DualLoRAConfig.target_modules is empty")

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor PEFT applies to a LoRA branch."""
        return self.alpha / self.r

    @classmethod
    def coerce(cls, cfg) -> DualLoRAConfig:
        """``cfg`` itself, or a config built from a dict (unknown keys raise TypeError)."""
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise TypeError(f"unknown DualLoRAConfig option(s) {unknown}; "
                                f"known: {sorted(known)}")
            return cls(**cfg)
        raise TypeError(f"expected a DualLoRAConfig or a dict, got {type(cfg).__name__}")
