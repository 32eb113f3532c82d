"""Learned per-token routing between the two adapters (FedALT's mixer, docs/patcher.md).

One router per patched layer, ``Linear(in_features, 2, bias=False)``, reads the layer's input
``x`` (before LoRA dropout) and gives every row (token) the weights ``softmax(x W^T)``, computed
in fp32, for the (global, local) branches:

    y = base(x) + s * (p_g(x) * B_g A_g x + p_l(x) * B_l A_l x),   p(x) = softmax(W x)

The weights become the op's per-row ``scale`` (M, R), so one fused call per layer serves the
whole batch and the gradient reaches the routers through the op's ``d scale = g * u``. Under a
``mix`` with float weights the routed weights are multiplied by them (``mix(model, 0, 1)``
turns the global branch off and skips it); tensor mix weights (any shape), a client bank
(``mix(..., clients=...)``) and an attached adapter source raise ValueError, and so does
``route`` on a merged model.

    routers = LayerRouters(model)            # fp32 masters, PEFT-like Kaiming-uniform init
    with route(model, routers):
        loss = model(**batch).loss           # gradients reach routers.parameters()
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .layers import dual_lora_layers
from .precision import master_dtype

__all__ = ["LayerRouters", "route"]

_SUFFIX = ".router.weight"


class LayerRouters(nn.Module):
    """One ``Linear(in_features, 2, bias=False)`` per ``DualLoRALinear`` of a model, in fp32
    on the layers' device (fp32 masters under a half-precision base, as the adapters)."""

    def __init__(self, model: nn.Module):
        """Args:
            model: a model patched by ``feddpa_fast.patch``.

        Raises:
            ValueError: the model has no patched layers.
        """
        super().__init__()
        layers = dual_lora_layers(model)
        if not layers:
            raise ValueError("model has no DualLoRALinear layers; call feddpa_fast.patch first")
        self.layer_names = [name for name, _ in layers]
        weight = layers[0][1].base_layer.weight
        factory = {"device": weight.device, "dtype": master_dtype(weight.dtype)}
        self.routers = nn.ModuleList(
            [nn.Linear(layer.in_features, 2, bias=False, **factory) for _, layer in layers])
        self.reset(0)

    def reset(self, seed: int) -> None:
        """Kaiming-uniform (a = sqrt(5), PEFT's and nn.Linear's) from a seeded generator."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for router in self.routers:
                w = router.weight
                bound = 1.0 / math.sqrt(w.shape[1])
                w.copy_(torch.rand(w.shape, generator=gen, dtype=torch.float64)
                        .mul_(2 * bound).sub_(bound).to(w.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"<layer name>.router.weight": (2, K)}``: detached copies, for saving."""
        return {name + _SUFFIX: router.weight.detach().clone()
                for name, router in zip(self.layer_names, self.routers)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copies ``tensors`` (the keys of ``tensors()``) in, after checking all of them.

        Raises:
            ValueError: missing or unexpected keys, a wrong shape or a non-finite value.
        """
        expected = {name + _SUFFIX: router.weight
                    for name, router in zip(self.layer_names, self.routers)}
        if set(tensors) != set(expected):
            raise ValueError(f"router tensors: missing {sorted(set(expected) - set(tensors))[:3]}"
                             f", unexpected {sorted(set(tensors) - set(expected))[:3]}")
        for key, param in expected.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ValueError(f"router tensor {key}: shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(param.shape)}")
            if not bool(torch.isfinite(tensors[key]).all()):
                raise ValueError(f"router tensor {key} has non-finite values")
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(tensors[key])


@contextlib.contextmanager
def route(model: nn.Module, routers: LayerRouters):
    """Every patched layer of ``model`` mixes its two adapters per token with its router for
    the ``with`` block (module docstring).

    Args:
        model: a model patched by ``feddpa_fast.patch``.
        routers: ``LayerRouters`` built for this model (same layer names and sizes).

    Returns:
        A context manager yielding ``model``.

    Raises:
        ValueError: the routers were built for other layers, or a layer is merged (a merged
            layer is its base layer: there would be nothing to route).
    """
    layers = dual_lora_layers(model)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"route: layers {merged[:3]} are merged; unmerge(model) first")
    names = [name for name, _ in layers]
    if names != routers.layer_names:
        raise ValueError(f"the routers were built for other layers: {len(routers.layer_names)} "
                         f"routers, {len(names)} patched layers")
    for (name, layer), router in zip(layers, routers.routers):
        if router.in_features != layer.in_features:
            raise ValueError(f"router of {name!r} reads {router.in_features} features, the "
                             f"layer's input has {layer.in_features}")
    previous = [layer.set_router(router) for (_, layer), router in zip(layers, routers.routers)]
    try:
        yield model
    finally:
        for (_, layer), state in zip(layers, previous):
            layer.set_router(state)
