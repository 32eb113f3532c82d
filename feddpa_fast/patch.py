"""``patch`` / ``unpatch`` / ``merge`` / ``unmerge`` for Hugging Face (or any torch) models.

``patch`` wraps each targeted ``nn.Linear`` / ``Conv1D`` instance in a ``DualLoRALinear``
(the original module becomes its ``base_layer``); it never touches classes or
``torch.nn.functional``. It freezes every parameter of the model (as PEFT does) and makes both
adapters trainable; ``unpatch`` puts the very same original module objects back and restores
each parameter's ``requires_grad``, so outputs are bit-identical to before.
"""
from __future__ import annotations

import re
import warnings

from torch import nn

from .config import DualLoRAConfig
from .layers import DualLoRALinear, dual_lora_layers, is_supported_base

__all__ = ["patch", "unpatch", "merge", "unmerge", "matched_module_names", "patched_config"]

_STATE_ATTR = "_feddpa_fast_state"  # set on the patched model: (config, saved requires_grad)


def _name_matches(name: str, spec) -> bool:
    """PEFT's rule: a string is a full-match regex; a sequence matches by suffix (``.x``)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the LM / output head, which "all-linear" never targets."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] == "lm_head":
            heads.add(name)
    return heads


def matched_module_names(model: nn.Module, cfg: DualLoRAConfig) -> list[str]:
    """Names of the modules ``patch(model, cfg)`` wraps (raises when a target is not linear)."""
    cfg = DualLoRAConfig.coerce(cfg)
    heads = _output_head_names(model) if cfg.target_modules == "all-linear" else set()
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, DualLoRALinear) or _inside_dual_layer(name, model):
            continue
        if cfg.target_modules == "all-linear":
            selected = is_supported_base(module) and name not in heads
        else:
            selected = _name_matches(name, cfg.target_modules)
        if not selected or (cfg.exclude and _name_matches(name, cfg.exclude)):
            continue
        if not is_supported_base(module):
            raise TypeError(f"target {name!r} is a {type(module).__name__}; only nn.Linear and "
                            "transformers' Conv1D can be patched (narrow target_modules)")
        names.append(name)
    return names


def _inside_dual_layer(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, DualLoRALinear):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patched_config(model: nn.Module) -> DualLoRAConfig | None:
    """The config ``model`` was patched with, or None when it is not patched."""
    state = getattr(model, _STATE_ATTR, None)
    return state[0] if state else None


def patch(model: nn.Module, cfg) -> nn.Module:
    """Wraps the targeted layers of ``model`` in ``DualLoRALinear`` (in place) and returns it.

    Idempotent: patching again with the same config changes nothing. Every parameter of the
    model is frozen; the adapters are the only trainable tensors (``set_trainable`` picks them).

    Args:
        model: any ``nn.Module`` (a Hugging Face model, typically).
        cfg: a ``DualLoRAConfig`` or a dict of its fields (rank, alpha, dropout, targets).
    Returns:
        ``model`` itself, patched.
    Raises:
        ValueError: nothing matches the targets, or the model is already patched with a
            different config (``unpatch`` it first). TypeError: unknown config keys.
    """
    cfg = DualLoRAConfig.coerce(cfg)
    current = patched_config(model)
    if current is not None:
        if current == cfg:
            return model
        raise ValueError(f"model is already patched with {current}; unpatch() it before "
                         f"patching with {cfg}")
    names = matched_module_names(model, cfg)
    if not names:
        candidates = sorted({n.split(".")[-1] for n, m in model.named_modules()
                             if is_supported_base(m)})
        raise ValueError(f"no module matches target_modules={cfg.target_modules!r} "
                         f"(exclude={cfg.exclude!r}); linear layer names here: {candidates}")
    if cfg.target_modules == "all-linear":
        _warn_skipped_expert_weights(model)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = DualLoRALinear(base, cfg.r, cfg.alpha, cfg.dropout)
        # A new module starts in train mode; a model loaded for inference (from_pretrained
        # returns it in eval mode) must stay deterministic: no LoRA dropout in generate().
        layer.train(base.training)
        _set_submodule(model, name, layer)
    setattr(model, _STATE_ATTR, (cfg, saved_flags))
    return model


def _warn_skipped_expert_weights(model: nn.Module) -> None:
    """One warning naming the 3-D weights "all-linear" leaves alone (transformers 5 keeps a
    mixture of experts' weights as one (experts, out, in) parameter, not as nn.Linear)."""
    skipped = [name for name, p in model.named_parameters() if p.dim() == 3]
    if skipped:
        shown = ", ".join(skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4
                                          else "")
        warnings.warn(f'target_modules="all-linear" patches nn.Linear and Conv1D layers only; '
                      f"{len(skipped)} 3-D (per-expert) weights stay without LoRA: {shown}",
                      UserWarning, stacklevel=3)


def unpatch(model: nn.Module) -> nn.Module:
    """Puts the original modules back and restores ``requires_grad`` flags.

    A merged layer is unmerged first, so the base weights are exactly the original ones.

    Args:
        model: a model patched by ``patch``.
    Returns:
        ``model`` itself, with its original modules.
    Raises:
        ValueError: the model is not patched.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model is not patched by feddpa_fast")
    for name, layer in dual_lora_layers(model):
        if layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    _, saved_flags = state
    for name, p in model.named_parameters():
        if name in saved_flags:
            p.requires_grad_(saved_flags[name])
    delattr(model, _STATE_ATTR)
    return model


def _layers_or_raise(model: nn.Module):
    layers = [layer for _, layer in dual_lora_layers(model)]
    if not layers:
        raise ValueError("model has no DualLoRALinear layers; call feddpa_fast.patch first")
    return layers


def merge(model: nn.Module, global_w: float, local_w: float) -> nn.Module:
    """Folds ``global_w * global + local_w * local`` into every base weight (for inference).

    All layers are checked first (finite deltas, none merged yet), so a failure merges nothing.
    The merged model runs the plain base layers; ``unmerge`` restores the weights exactly.

    Args:
        model: a patched model.
        global_w, local_w: finite floats (per-instance weights cannot be merged).
    Returns:
        ``model`` itself, merged.
    Raises:
        ValueError: not patched, already merged, a non-float or non-finite weight, or a
            non-finite merged weight (nothing is merged then).
    """
    layers = _layers_or_raise(model)
    for w in (global_w, local_w):
        if not isinstance(w, (int, float)) or w != w or w in (float("inf"), float("-inf")):
            raise ValueError(f"merge takes finite float weights, got {w!r} (per-instance "
                             "weights cannot be merged into one weight)")
    if any(layer.merged for layer in layers):
        raise ValueError("model is already merged; call unmerge(model) first")
    done = []
    try:
        for layer in layers:
            layer.merge(global_w, local_w)
            done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undoes ``merge``: every base weight is restored bit for bit."""
    layers = _layers_or_raise(model)
    if not any(layer.merged for layer in layers):
        raise ValueError("model is not merged")
    for layer in layers:
        if layer.merged:
            layer.unmerge()
    return model
