"""The mixing API: how much of each adapter every sequence of a batch gets, and which adapter
trains (DESIGN section 3).

    with feddpa_fast.mix(model, global_w, local_w):
        out = model(**batch)            # and loss.backward() here, see below

``global_w`` / ``local_w``: a float, or a tensor of shape (batch,) giving each sequence its own
weight (broadcast to every token of the sequence; one fused op call per layer serves the whole
batch). Nesting and exceptions restore the previous weights.

Gradient checkpointing recomputes layer forwards during ``backward``; call ``backward`` inside
the ``mix`` block then, or the recomputation sees the weights outside it.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .config import ADAPTERS
from .layers import dual_lora_layers

__all__ = ["mix", "set_trainable", "print_trainable", "trainable_counts"]


def _check_weight(name: str, w):
    if isinstance(w, bool):
        raise TypeError(f"{name} must be a float or a 1-D tensor, got a bool")
    if isinstance(w, (int, float)):
        if not math.isfinite(w):
            raise ValueError(f"{name} must be finite, got {w}")
        return float(w)
    if isinstance(w, torch.Tensor):
        if w.dim() == 0:
            if not torch.compiler.is_compiling() and not bool(torch.isfinite(w)):
                raise ValueError(f"{name} must be finite, got {w}")
            return w if w.requires_grad else float(w)  # keep the graph of a learnable weight
        if w.dim() != 1 or w.shape[0] == 0:
            raise ValueError(f"{name} must be a float or a tensor of shape (batch,), got shape "
                             f"{tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {w.dtype}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name} has non-finite entries")
        return w
    raise TypeError(f"{name} must be a float or a tensor of shape (batch,), got "
                    f"{type(w).__name__}")


@contextlib.contextmanager
def mix(model: nn.Module, global_w, local_w):
    """Sets the adapter weights of every patched layer of ``model`` for the ``with`` block."""
    global_w = _check_weight("global_w", global_w)
    local_w = _check_weight("local_w", local_w)
    sizes = {w.shape[0] for w in (global_w, local_w) if isinstance(w, torch.Tensor) and w.dim()}
    if len(sizes) > 1:
        raise ValueError(f"global_w and local_w have different batch sizes: {sorted(sizes)}")
    layers = [layer for _, layer in dual_lora_layers(model)]
    if not layers:
        raise ValueError("model has no DualLoRALinear layers; call feddpa_fast.patch first")
    previous = [(layer.mix_weights, layer._scale_cache) for layer in layers]
    shared_scales = {}  # one scale tensor per input shape for the whole model (layers.py)
    for layer in layers:
        layer.mix_weights = (global_w, local_w)
        layer._scale_cache = shared_scales
    try:
        yield model
    finally:
        for layer, (weights, cache) in zip(layers, previous):
            layer.mix_weights, layer._scale_cache = weights, cache


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
    """Prints (and returns) PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_counts(model)
    line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
    print(line)
    return line
