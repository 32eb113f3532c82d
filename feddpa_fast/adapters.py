"""Adapters in PEFT's on-disk format (docs/ARCHITECTURE.md §2).

A directory with ``adapter_config.json`` (a LoRA config PEFT reads) and
``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight``, metadata ``{"format": "pt"}``), so that
``peft.PeftModel.from_pretrained(base, dir)`` loads either adapter of a patched model, and
``load_adapter`` reads what PEFT saved. Loading validates everything (files, config, key set,
shapes, finiteness) before it touches the model: a bad adapter leaves the model unchanged.
Saving replaces each file atomically (temp file, fsync, rename), so a crash never leaves a
half-written file; other files in the directory are kept.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write_bytes
from .config import ADAPTERS
from .errors import FeddpaError
from .layers import dual_lora_layers
from .patch import _name_matches
from .sealed import IntegrityError, read_sealed, sealed_bytes

__all__ = ["save_adapter", "load_adapter", "read_adapter", "write_adapter", "adapter_state_dict",
           "load_adapter_state_dict", "check_adapter_tensors", "adapter_key", "AdapterError",
           "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterError(FeddpaError, ValueError):
    """An adapter directory or state dict that does not fit the patched model."""


def _check_adapter_name(adapter: str) -> None:
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")


def _layers(model: nn.Module):
    layers = dual_lora_layers(model)
    if not layers:
        raise ValueError("model has no DualLoRALinear layers; call feddpa_fast.patch first")
    return layers


def adapter_state_dict(model: nn.Module, adapter: str = "global") -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's key names (contiguous copies, on the CPU)."""
    _check_adapter_name(adapter)
    out = {}
    for name, layer in _layers(model):
        for part, modules in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            out[f"{_PREFIX}{name}.{part}.weight"] = \
                modules[adapter].weight.detach().to("cpu", copy=True).contiguous()
    return out


def _adapter_params(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT key -> the patched model's parameter of ``adapter``."""
    expected = {}
    for name, layer in _layers(model):
        for part, modules in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            expected[f"{_PREFIX}{name}.{part}.weight"] = modules[adapter].weight
    return expected


def check_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                          adapter: str = "global") -> None:
    """Raises AdapterError unless ``tensors`` (PEFT key names) fit one adapter of ``model``
    exactly: the same keys, shapes, floating point, finite."""
    _check_adapter_name(adapter)
    expected = _adapter_params(model, adapter)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"adapter keys do not match the patched layers: missing "
                           f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                           f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for key, param in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(param.shape):
            raise AdapterError(f"{key}: shape {tuple(t.shape)}, "
                               f"the model's is {tuple(param.shape)}")
        if not t.is_floating_point():
            raise AdapterError(f"{key}: dtype {t.dtype} is not floating point")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{key}: has non-finite values")


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                            adapter: str = "global") -> None:
    """Copies ``tensors`` (PEFT key names) into one adapter, after checking all of them."""
    check_adapter_tensors(model, tensors, adapter)
    with torch.no_grad():
        for key, param in _adapter_params(model, adapter).items():
            param.copy_(tensors[key])  # in place: the stacked views stay intact


def adapter_key(layer_name: str, part: str) -> str:
    """The PEFT key of one layer's ``lora_A`` / ``lora_B`` weight."""
    return f"{_PREFIX}{layer_name}.{part}.weight"


def _target_spec(model: nn.Module, names: list[str]):
    """The shortest PEFT ``target_modules`` that selects exactly ``names`` in ``model``."""
    inside = tuple(n + "." for n in names)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    suffixes = sorted({n.split(".")[-1] for n in names})
    if {n for n in candidates if _name_matches(n, suffixes)} == set(names):
        return suffixes
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "global") -> Path:
    """Writes one adapter of a patched model as a PEFT LoRA adapter directory.

    Each file (``adapter_model.safetensors``, then ``adapter_config.json``) is replaced
    atomically; other files already in the directory are kept, as PEFT's save_pretrained does.

    Args:
        model: a patched model.
        directory: where to write (created if missing).
        adapter: ``"global"`` or ``"local"``.
    Returns:
        The directory, as a ``Path``.
    Raises:
        ValueError: an unknown adapter name, an unpatched model, or targets mixing
            ``nn.Linear`` and ``Conv1D`` (PEFT's format has one fan_in_fan_out flag).
    """
    _check_adapter_name(adapter)
    first = _layers(model)[0][1]
    return write_adapter(model, directory, adapter_state_dict(model, adapter), first.r[adapter],
                         first.scaling[adapter])


def write_adapter(model: nn.Module, directory: str | os.PathLike,
                  tensors: dict[str, torch.Tensor], r: int, scaling: float) -> Path:
    """Writes ``tensors`` (PEFT key names, one adapter of ``model``'s patched layers) as a PEFT
    LoRA directory of rank ``r`` and scaling ``scaling`` (what ``save_adapter`` writes).

    Returns:
        The directory, as a ``Path``.
    """
    layers = _layers(model)
    first = layers[0][1]
    names = [n for n, _ in layers]
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        # lora_alpha = scaling * r, so an adapter loaded with rsLoRA scaling keeps its scaling.
        "r": r, "lora_alpha": scaling * r,
        "lora_dropout": first.dropout_p, "target_modules": _target_spec(model, names),
        "fan_in_fan_out": bool(first.fan_in_fan_out), "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    if any(layer.fan_in_fan_out != first.fan_in_fan_out for _, layer in layers):
        raise ValueError("save_adapter: PEFT's format has one fan_in_fan_out flag, but this "
                         "model mixes nn.Linear and Conv1D targets")
    directory = Path(directory)
    # Each file is replaced atomically and other files in the directory are kept (as PEFT's
    # save_pretrained does): the weights first, then the config that describes them.
    # The SHA-256 of the tensors rides in the file's own metadata (feddpa_fast/sealed.py):
    # PEFT reads past extra metadata keys, and load_adapter refuses a file changed on disk.
    atomic_write_bytes(directory / WEIGHTS_NAME, sealed_bytes(tensors, {"format": "pt"}))
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: not a LoRA adapter config (peft_type "
                           f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
    for feature in ("use_dora", "lora_bias"):
        if config.get(feature):
            raise AdapterError(f"{path}: {feature}=true is not supported by feddpa_fast")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{path}: per-module rank_pattern/alpha_pattern is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save is not supported (adapters only)")
    return config


def read_adapter(model: nn.Module, directory: str | os.PathLike,
                 adapter: str = "global") -> tuple[dict[str, torch.Tensor], float, float]:
    """Reads and checks a PEFT LoRA adapter directory against one adapter of a patched model,
    changing nothing.

    Args:
        model: a patched model.
        directory: a PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``).
        adapter: ``"global"`` or ``"local"``: the adapter whose rank and shapes it must fit.
    Returns:
        (tensors under PEFT's key names, lora_alpha, scaling), every key, shape and value
        checked.
    Raises:
        As ``load_adapter``.
    """
    _check_adapter_name(adapter)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    config = _read_config(directory)
    layers = _layers(model)
    names = [n for n, _ in layers]
    r = config.get("r")
    ranks = {layer.r[adapter] for _, layer in layers}
    if ranks != {r}:
        raise AdapterError(f"{directory}: rank r={r!r}, but the model's {adapter} adapter has "
                           f"rank {sorted(ranks)}")
    targets = config.get("target_modules")
    if isinstance(targets, (str, list)) and targets != "all-linear":
        selected = [n for n in names if _name_matches(n, targets)]
        if selected != names:
            raise AdapterError(f"{directory}: target_modules={targets!r} selects "
                               f"{len(selected)} of the model's {len(names)} patched layers")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:  # a digest, when the file has one (ours do; PEFT's own files do not), is verified
        tensors, _ = read_sealed(weights, required=False)
    except IntegrityError as exc:
        raise AdapterError(str(exc)) from None
    except OSError as exc:
        raise AdapterError(f"{weights}: unreadable safetensors file ({exc})") from None
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise AdapterError(f"{directory}: lora_alpha must be a positive number, got {alpha!r}")
    check_adapter_tensors(model, tensors, adapter)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return tensors, alpha, scaling


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "global") -> None:
    """Loads a PEFT LoRA adapter directory into one adapter of a patched model.

    Checks the rank, the target modules, every key and shape before changing anything;
    ``lora_alpha`` of the file sets the adapter's scaling (``alpha / r``, or ``alpha / sqrt(r)``
    with ``use_rslora``).

    Args:
        model: a patched model.
        directory: a PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``).
        adapter: ``"global"`` or ``"local"``.
    Returns:
        None; the adapter's weights and scaling are replaced.
    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        AdapterError (a ValueError): a bad config (rank, targets, DoRA, rank patterns,
            modules_to_save, lora_alpha), an unreadable weights file, or wrong keys, shapes or
            non-finite values.
    """
    tensors, alpha, scaling = read_adapter(model, directory, adapter)
    load_adapter_state_dict(model, tensors, adapter)
    for _, layer in _layers(model):
        layer.lora_alpha[adapter] = alpha
        layer.scaling[adapter] = scaling
