"""Rows -> sequences: which mix weight each row of a layer's input gets (docs/ARCHITECTURE.md §2).

``mix`` gives weights per sequence, shape (batch,), or per token, shape (batch, seq_len). A
patched layer sees its input ``x`` of shape (..., K), M = prod(leading dims) rows, and the op
wants one scale per row. The rule (``expand``):

- The input is batch-major and its first dim holds a whole multiple ``k * batch`` of the
  batch's sequences: sequence i owns the block of rows [i * M / batch, (i + 1) * M / batch).
  This covers, with one rule:
    * the plain (batch, T, K) input (k = 1);
    * beam search and ``num_return_sequences``, which expand the batch with
      ``repeat_interleave`` (k beams or samples per sequence, consecutive): (k * batch, T, K);
    * a flattened (batch * T, K) input (OPT's decoder MLP), which is batch-major: k = T.
  A first dim that is not a multiple of the batch raises ValueError, as does an empty input.
- Per-sequence weights repeat over their sequence's whole block.
- Per-token weights (batch, seq_len), with T the number of positions per row of the input
  (``x.shape[1:-1]``; for a flattened 2-D input, the positions of the current model call, as
  ``mix`` reads them from ``input_ids`` / ``inputs_embeds``):
    * T == seq_len: token t of every row of sequence i gets weight [i, t] (every beam / sample
      copy gets the same row of weights);
    * T == 1 < seq_len: an incremental decoding step (``generate`` with a KV cache feeds one new
      token per row): the token gets its sequence's **last column** [i, -1], i.e. the weight of
      the last prompt token (with left padding, the last real one) applies to every generated
      token;
    * anything else raises ValueError naming the weight's seq_len.
  A flattened 2-D input outside a model call (no positions recorded) is read as whole
  sequences: its rows per sequence must be a multiple of seq_len.
"""
from __future__ import annotations

import math

import torch

__all__ = ["weight_table", "expand"]


def weight_table(weights, names, acc: torch.dtype, device) -> torch.Tensor:
    """The mix weights as one (batch, T, branches) tensor in ``acc`` (T = 1: per sequence).

    Args:
        weights: one weight per branch: a float, a 0-d tensor, (batch,) or (batch, seq_len).
        names: the argument name of each weight, for error messages.
        acc: the accumulation dtype of the layer (the op's ``scale`` dtype).
        device: where the layer runs (a weight on another device of the same model moves).

    Returns:
        (batch, T, len(weights)); T = seq_len when any weight is per token, else 1.
    """
    shaped = [w for w in weights if isinstance(w, torch.Tensor) and w.dim() >= 1]
    batch = shaped[0].shape[0]
    seq = max(w.shape[1] if w.dim() == 2 else 1 for w in shaped)
    columns = []
    for w, name in zip(weights, names):
        if not isinstance(w, torch.Tensor):
            columns.append(torch.full((batch, seq), float(w), dtype=acc, device=device))
            continue
        w = w.to(device=device, dtype=acc)  # keeps the graph of a learnable weight
        if w.dim() == 1:
            w = w.unsqueeze(1)
        if w.dim() == 2 and w.shape[1] not in (1, seq):  # mix() checks this; layers called
            raise ValueError(f"{name} has seq_len {w.shape[1]}, the other weight {seq}")
        columns.append(w.expand(batch, seq))
    return torch.stack(columns, dim=-1)


def expand(table: torch.Tensor, x: torch.Tensor, names, token_names=(),
           call_positions: int | None = None) -> torch.Tensor:
    """Per-row weights (M, branches) for the layer input ``x`` by the module docstring's rule.

    Args:
        table: (batch, T, branches) from ``weight_table``.
        x: the layer input (..., K).
        names: the weights' argument names, for error messages.
        token_names: the names of the per-token ones among them.
        call_positions: positions per row of the current model call (input_ids.shape[-1]),
            used for a flattened 2-D ``x`` under per-token weights; None when unknown.

    Returns:
        (M, branches), M = x.numel() / K, rows in x's (row-major) order.
    """
    batch, seq, branches = table.shape
    rows = x.shape[0] if x.dim() >= 2 else 1
    m = math.prod(x.shape[:-1])
    label = " / ".join(names)
    if rows == 0 or m == 0:
        raise ValueError(f"mix weights ({label}) are given for a batch of {batch} sequences, "
                         f"but this layer's input is empty: shape {tuple(x.shape)}")
    if rows % batch:
        raise ValueError(
            f"mix weights ({label}) are given for a batch of {batch} sequences, but this "
            f"layer's input has shape {tuple(x.shape)}: its first dim {rows} is not a multiple "
            f"of {batch} (beam search / num_return_sequences give k * batch rows, a flattened "
            f"input batch * seq_len rows)")
    block = m // batch  # rows of one sequence (all its beams / samples / tokens)
    if seq == 1:
        return table[:, 0].unsqueeze(1).expand(batch, block, branches).reshape(m, branches)
    positions = m // rows if x.dim() >= 3 else call_positions
    if x.dim() < 3 and positions is None:  # a flattened input outside a model call
        positions = seq if block % seq == 0 else None
    if positions == seq and block % seq == 0:
        copies = block // seq
        return table.unsqueeze(1).expand(batch, copies, seq, branches).reshape(m, branches)
    if positions == 1:  # incremental decoding: the last column applies
        return table[:, -1].unsqueeze(1).expand(batch, block, branches).reshape(m, branches)
    raise ValueError(
        f"{' / '.join(token_names)} gives one weight per token for seq_len {seq}, but this "
        f"layer's input has shape {tuple(x.shape)} ({positions if positions is not None else '?'}"
        f" positions per row); a per-token weight needs the same seq_len, or one new token per "
        f"row (an incremental decoding step, which takes the last column)")
