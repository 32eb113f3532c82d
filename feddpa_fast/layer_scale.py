"""The op's ``scale`` operand of a ``DualLoRALinear`` under the current mix (docs/ARCHITECTURE.md
§1): alpha / r times each branch's weight, per rank column, as one row (float weights) or one
row per input row (per-sequence and per-token weights, by the rule of ``feddpa_fast.rows``),
built once per input shape for every layer of a ``mix`` block."""
from __future__ import annotations

import torch

from . import rows
from .config import ADAPTERS
from .kernels import reference

__all__ = ["MixScaleMixin", "WEIGHT_NAMES"]

# The argument names of ``mix`` for the two branches' weights (error messages name them).
WEIGHT_NAMES = ("global_w", "local_w")


class MixScaleMixin:
    """``_scale`` and the per-block cache; ``DualLoRALinear`` holds ``r``, ``scaling``,
    ``mix_weights``, ``_scale_cache``, ``_mix_call`` and ``_router``."""

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """The op's ``scale``: (1, R) for float weights, (M, R) for per-sequence weights or
        under a router."""
        if self._router is not None:  # per layer and with a graph: never cached
            return self._routed_scale(x)
        key = tuple((self.r[n], self.scaling[n]) for n in ADAPTERS)
        return self._cached(x, key, lambda: self._build_scale(x))

    def _cached(self, x: torch.Tensor, extra: tuple, build):
        """``build()``, reused across the layers of a ``mix`` block for the same input shape
        (and ``extra``): the cache is one dict per block, shared by the model's layers."""
        cache = self._scale_cache
        if (cache is None or torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
                or any(isinstance(w, torch.Tensor) and w.requires_grad for w in self.mix_weights)):
            # Not reused: a scale with a graph (across forwards), or an inference tensor
            # (autograd could not save it in a later training forward).
            return build()
        call = self._mix_call.get("positions") if self._mix_call else None
        key = (tuple(x.shape[:-1]), x.device, x.dtype, call, extra)
        if key not in cache:
            if len(cache) >= 16:  # e.g. generate() without KV cache: one length per step
                cache.clear()
            cache[key] = build()
        return cache[key]

    def _build_scale(self, x: torch.Tensor) -> torch.Tensor:
        acc = reference.accum_dtype(x.dtype)
        weights = self.mix_weights
        if not any(isinstance(w, torch.Tensor) and w.dim() for w in weights):
            if not any(isinstance(w, torch.Tensor) for w in weights):
                # torch.full per branch: static sizes, so torch.compile sees no data-dependent
                # shape (repeat_interleave with tensor repeats would be one).
                return torch.cat([torch.full((self.r[n],), float(w) * self.scaling[n], dtype=acc,
                                             device=x.device) for w, n in zip(weights, ADAPTERS)]
                                 ).unsqueeze(0)
            # 0-d tensor weights (which may require grad): tensor arithmetic keeps the graph.
            parts = [(torch.as_tensor(w, dtype=acc, device=x.device) * self.scaling[n])
                     .reshape(1).expand(self.r[n]) for w, n in zip(weights, ADAPTERS)]
            return torch.cat(parts).unsqueeze(0)
        per_row = self._per_row_weights(x, acc)  # (M, branches)
        m = per_row.shape[0]
        return torch.cat([(per_row[:, i:i + 1] * self.scaling[n]).expand(m, self.r[n])
                          for i, n in enumerate(ADAPTERS)], dim=1)

    def _routed_scale(self, x: torch.Tensor) -> torch.Tensor:
        """(M, R): each row's router softmax, in fp32 (fp64 for fp64 x), times the float mix
        weights (feddpa_fast/routing.py)."""
        weights = self.mix_weights
        if any(isinstance(w, torch.Tensor) for w in weights):
            raise ValueError("a routed layer (feddpa_fast.route) takes float mix weights, got "
                             f"{[type(w).__name__ for w in weights]}")
        acc = reference.accum_dtype(x.dtype)
        router = self._router[0]
        with torch.autocast(x.device.type, enabled=False):  # fp32 logits under autocast too
            logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).to(acc),
                                                router.weight.to(acc))
        probs = torch.softmax(logits, dim=-1)  # (M, 2): (global, local)
        m = probs.shape[0]
        return torch.cat([(probs[:, i:i + 1] * (float(w) * self.scaling[n])).expand(m, self.r[n])
                          for i, (w, n) in enumerate(zip(weights, ADAPTERS))], dim=1)

    def _per_row_weights(self, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """Per-sequence or per-token weights as one weight per row of ``x`` and branch,
        (M, branches), by the rule of rows.py."""
        weights = self.mix_weights
        table = rows.weight_table(weights, WEIGHT_NAMES, acc, x.device)
        token_names = [n for w, n in zip(weights, WEIGHT_NAMES)
                       if isinstance(w, torch.Tensor) and w.dim() == 2]
        call = self._mix_call.get("positions") if self._mix_call else None
        return rows.expand(table, x, WEIGHT_NAMES, token_names, call)
