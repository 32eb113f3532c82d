"""Per-token mix weights for packed batches: several sequences in one row, as
``transformers.DataCollatorWithFlattening`` builds them (``input_ids`` (1, total) with
``position_ids`` restarting for each sequence) or as varlen attention describes them
(``cu_seqlens``).

    weights = feddpa_fast.packed_weights(torch.tensor([0.2, 0.9, 0.5]), position_ids=pos)
    with feddpa_fast.mix(model, weights, 1.0 - weights):
        model(input_ids=packed_ids, position_ids=pos)

Sequence boundaries follow transformers' own rule for packed position_ids (a new sequence starts
wherever a position is not the previous one plus 1, and at the start of every row), so the
weights switch exactly where the attention mask of a packed batch does.
"""
from __future__ import annotations

import torch

__all__ = ["packed_weights"]


def _as_weights(weights) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or not weights.is_floating_point():
            raise ValueError(f"weights must be a 1-D floating tensor (one weight per packed "
                             f"sequence), got shape {tuple(weights.shape)}, {weights.dtype}")
        return weights
    if isinstance(weights, (list, tuple)) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        return torch.tensor([float(w) for w in weights])
    raise TypeError(f"weights must be a 1-D tensor or a list of floats, got "
                    f"{type(weights).__name__}")


def _sequence_index(position_ids=None, cu_seqlens=None) -> torch.Tensor:
    """(rows, T) int64: the packed sequence every token belongs to, counted row-major."""
    if (position_ids is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of position_ids or cu_seqlens")
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 \
                or position_ids.is_floating_point() or 0 in position_ids.shape:
            raise ValueError("position_ids must be a non-empty (rows, T) integer tensor, got "
                             f"{getattr(position_ids, 'shape', type(position_ids).__name__)}")
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        return starts.flatten().long().cumsum(0).sub(1).view_as(position_ids)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 \
            or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [0, end_1, ..., total]")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if int(cu_seqlens[0]) != 0 or bool((lengths <= 0).any()):
        raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got "
                         f"{cu_seqlens.tolist()}")
    index = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return index.repeat_interleave(lengths).unsqueeze(0)


def packed_weights(weights, *, position_ids: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token weights of a packed batch from one weight per packed sequence.

    Args:
        weights: (n,) one weight per packed sequence, in packing order (row-major: the
            sequences of row 0 first); a tensor that requires grad keeps its graph, so the
            result can be trained through.
        position_ids: (rows, T) the packed batch's position ids (each sequence restarts), or
        cu_seqlens: (n + 1,) cumulative sequence lengths [0, len_1, len_1 + len_2, ...] of one
            packed row.

    Returns:
        (rows, T) weights (rows = 1 for cu_seqlens), on the device and in the dtype of
        ``weights``: pass it to ``feddpa_fast.mix`` as ``global_w`` or ``local_w``.

    Raises:
        ValueError: when the packing holds a different number of sequences than ``weights``,
        or the position ids / cu_seqlens are malformed.
    """
    w = _as_weights(weights)
    index = _sequence_index(position_ids, cu_seqlens)
    count = int(index.max()) + 1
    if count != w.shape[0]:
        raise ValueError(f"the packing holds {count} sequences but weights has {w.shape[0]} "
                         "entries (one per packed sequence)")
    return w[index.to(w.device)]
