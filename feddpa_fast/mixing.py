"""The mixing API: how much of each adapter every sequence (or token) of a batch gets, and which
adapter trains (docs/ARCHITECTURE.md §2).

    with feddpa_fast.mix(model, global_w, local_w):
        out = model(**batch)            # and loss.backward() here, see below
        gen = model.generate(**batch, num_beams=2)   # beams / samples keep their sequence's mix

``global_w`` / ``local_w``, each one of:

- a float (the whole batch);
- a tensor of shape (batch,): one weight per sequence, broadcast to its tokens, to its beams
  (``num_beams``) and samples (``num_return_sequences``), and to its rows of a flattened
  (batch * seq_len, hidden) layer input;
- a tensor of shape (batch, seq_len): one weight per token (packed sequences, see
  ``feddpa_fast.packed_weights``; any per-token gating). In an incremental decoding step (one
  new token per row) the **last column** applies: every generated token gets the weight of its
  sequence's last prompt token.

The full rows -> sequences rule is in ``feddpa_fast.rows``. One fused op call per layer serves
the whole batch. Weights that require grad get gradients (training through the mix). Nesting
and exceptions restore the previous weights.

Bad weights raise before anything changes, naming the argument: a bool, string or other
non-number (TypeError); a tensor that is not floating point (TypeError); NaN or Inf anywhere
(ValueError: a non-finite mix weight makes every output it touches non-finite, so it is refused
rather than propagated); a shape other than (), (batch,) or (batch, seq_len), or a zero-length
batch or seq_len (ValueError); the two weights disagreeing on batch or seq_len (ValueError); a
tensor on a device where the model has no adapters (ValueError: moving it silently would copy it
for every layer of every forward). A layer input that the weights cannot cover (a row count that
is not a multiple of the batch, a per-token seq_len that does not match) raises ValueError at
forward time; the ``with`` block then restores the previous weights as on any exception.

Gradient checkpointing recomputes layer forwards during ``backward``; call ``backward`` inside
the ``mix`` block then, or the recomputation sees the weights outside it.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .client_bank import client_table
from .config import ADAPTERS
from .layers import dual_lora_layers

__all__ = ["mix", "set_trainable", "print_trainable", "trainable_counts"]

_SHAPES = "a float, or a tensor of shape (batch,) or (batch, seq_len)"


def _check_weight(name: str, w, devices: set):
    """``w`` as the layers store it (float or tensor); raises naming ``name`` when bad."""
    if isinstance(w, bool) or not isinstance(w, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be {_SHAPES}, got {type(w).__name__}")
    if not isinstance(w, torch.Tensor):
        if not math.isfinite(w):
            raise ValueError(f"{name} must be finite, got {w}")
        return float(w)
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.dim() > 2:
        raise ValueError(f"{name} must be {_SHAPES}, got shape {tuple(w.shape)}")
    if w.dim() and 0 in w.shape:
        raise ValueError(f"{name} has a zero-length batch or seq_len: shape {tuple(w.shape)}")
    if w.dim() and w.device not in devices:
        raise ValueError(f"{name} is on {w.device}, but the model's adapters are on "
                         f"{sorted(str(d) for d in devices)}; move it there first")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} has non-finite entries (NaN or Inf)")
    if w.dim() == 0 and not w.requires_grad:
        return float(w)
    return w  # a 0-d weight that requires grad keeps its graph


def _check_pair(global_w, local_w) -> None:
    shaped = {n: w for n, w in (("global_w", global_w), ("local_w", local_w))
              if isinstance(w, torch.Tensor) and w.dim()}
    batches = {w.shape[0] for w in shaped.values()}
    if len(batches) > 1:
        raise ValueError(f"global_w and local_w have different batch sizes: "
                         f"{ {n: w.shape[0] for n, w in shaped.items()} }")
    seqs = {w.shape[1] for w in shaped.values() if w.dim() == 2}
    if len(seqs) > 1:
        raise ValueError(f"global_w and local_w have different seq_len: "
                         f"{ {n: tuple(w.shape) for n, w in shaped.items()} }")


def _call_positions_hook(state: dict):
    """A forward pre-hook recording the positions per row of each model call, which tells a
    flattened 2-D layer input of a decoding step (one token per row) from a prompt."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
            state["positions"] = int(ids.shape[-1])
        elif isinstance(embeds, torch.Tensor) and embeds.dim() >= 3:
            state["positions"] = int(embeds.shape[1])
        else:
            state["positions"] = None
    return hook


def _client_table(model, layers, clients, global_w, local_w, device):
    """The (batch, 2) bank slots of ``clients`` (None: no clients), checked against the batch
    of the weights; refreshes each bank's shared global from the model's global adapter."""
    if clients is None:
        return None
    table = client_table(model, clients, device)
    shaped = [w for w in (global_w, local_w) if isinstance(w, torch.Tensor) and w.dim()]
    if shaped and shaped[0].shape[0] != table.shape[0]:
        raise ValueError(f"clients names {table.shape[0]} sequences but the weights are given "
                         f"for a batch of {shaped[0].shape[0]}")
    for layer in layers:
        layer.refresh_shared_global()
    return table


@contextlib.contextmanager
def mix(model: nn.Module, global_w, local_w, clients=None):
    """Sets the adapter weights of every patched layer of ``model`` for the ``with`` block.

    Args:
        model: a model patched by ``feddpa_fast.patch``.
        global_w: weight of the global adapter: a float, (batch,) or (batch, seq_len) tensor.
        local_w: weight of the local adapter, the same choices (module docstring).
        clients: None (the model's own two adapters), or one client name per sequence of the
            batch (``feddpa_fast.add_client``): each sequence runs through its client's
            adapters, in one op call per layer for the whole batch (feddpa_fast.client_bank).

    Returns:
        A context manager yielding ``model``.

    Raises:
        TypeError / ValueError, naming the argument, for the bad inputs the module docstring
        lists; nothing about the model changes then.
    """
    layers = [layer for _, layer in dual_lora_layers(model)]
    if not layers:
        raise ValueError("model has no DualLoRALinear layers; call feddpa_fast.patch first")
    devices = {layer.lora_A[ADAPTERS[0]].weight.device for layer in layers}
    global_w = _check_weight("global_w", global_w, devices)
    local_w = _check_weight("local_w", local_w, devices)
    _check_pair(global_w, local_w)
    table = _client_table(model, layers, clients, global_w, local_w, next(iter(devices)))
    per_token = any(isinstance(w, torch.Tensor) and w.dim() == 2 for w in (global_w, local_w))
    shared_scales = {}  # one scale tensor per input shape for the whole model (layers.py)
    call = {"positions": None, "clients": table}
    handles = []
    if per_token:  # positions are known only during a model call: reset after each one
        handles = [model.register_forward_pre_hook(_call_positions_hook(call), with_kwargs=True),
                   model.register_forward_hook(lambda *_: call.update(positions=None))]
    previous = [layer.set_mix((global_w, local_w), shared_scales, call) for layer in layers]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer, state in zip(layers, previous):
            layer.set_mix(*state)


def set_trainable(model: nn.Module, which: str) -> nn.Module:
    """Makes the ``"global"``, ``"local"``, ``"both"`` or ``"none"`` adapters trainable.

    Only adapter parameters change; the base model stays frozen.
    """
    choices = ("global", "local", "both", "none")
    if which not in choices:
        raise ValueError(f"set_trainable: which must be one of {choices}, got {which!r}")
    layers = [layer for _, layer in dual_lora_layers(model)]
    if not layers:
        raise ValueError("model has no DualLoRALinear layers; call feddpa_fast.patch first")
    for layer in layers:
        for name in ADAPTERS:
            on = which in (name, "both")
            layer.lora_A[name].weight.requires_grad_(on)
            layer.lora_B[name].weight.requires_grad_(on)
    return model


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared (tied) parameters are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable(model: nn.Module) -> str:
    """Prints (and returns) PEFT's line:
    ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_counts(model)
    line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
    print(line)
    return line
