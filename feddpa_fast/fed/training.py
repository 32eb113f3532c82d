"""A client's local training, shared by every method (fed/algorithms/): PEFT's seeded adapter
init, and one phase of AdamW steps on what the method names for that phase
(``Algorithm.train_target``). It imports no method and no client, so the methods can call it
at module level."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..layers import dual_lora_layers
from ..mixing import set_trainable

__all__ = ["batch_plan", "init_adapter", "loss_scaler", "optimizer_step", "train_phase"]

log = logging.getLogger("feddpa_fast.fed")


def init_adapter(model: nn.Module, adapter: str, seed: int) -> None:
    """PEFT's init (A Kaiming-uniform, B zero) for one adapter, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dual_lora_layers(model):
            a = layer.lora_A[adapter].weight
            bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, K)
            a.copy_(torch.rand(a.shape, generator=gen, dtype=torch.float64)
                    .mul_(2 * bound).sub_(bound).to(a.dtype))
            layer.lora_B[adapter].weight.zero_()


def loss_scaler(model: nn.Module) -> torch.amp.GradScaler:
    """Dynamic loss scaling under an fp16 base, a no-op otherwise.

    fp16 keeps full precision down to 6.1e-5 and flushes to zero below 6e-8 (its smallest
    subnormal): the activation gradients flowing back through an fp16 base lose their small
    values, so the loss is scaled up and the fp32 masters' gradients unscaled before AdamW; a
    step whose gradients overflowed is skipped and the scale halved. It starts at 2^10, not
    torch's 2^16: a phase is a few steps (8 in the demos), and each halving from too high a
    start costs a skipped step (a loss near 10 times 2^10 stays far from fp16's 65,504 max).
    bf16 has fp32's exponent range and fp32 needs nothing: there the scaler is disabled and a
    step is exactly ``loss.backward(); opt.step()``. A new scaler per phase, like the
    optimizer, so a resumed run repeats the same steps bit for bit.
    """
    fp16 = any(p.dtype == torch.float16 for p in model.parameters())
    device = next(model.parameters()).device.type
    return torch.amp.GradScaler(device, init_scale=2.0 ** 10, enabled=fp16)


def batch_plan(size: int, settings, gen: torch.Generator) -> list[list[int]]:
    """A client's batches of one phase, in order: each epoch a ``randperm`` of its ``size``
    examples from ``gen`` (the phase's seeded generator), cut into ``batch_size`` batches, the
    first ``max_steps`` of them (the generator serves nothing else, so drawing every epoch's
    order up front draws what the epoch loop drew)."""
    plan = []
    for _ in range(settings.local_epochs):
        order = torch.randperm(size, generator=gen).tolist()
        batches = [order[i:i + settings.batch_size]
                   for i in range(0, len(order), settings.batch_size)]
        plan += batches[: settings.max_steps]
    return plan


def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int:
    """One AdamW step through the loss scaler, then the gradients cleared; returns 1 when an
    fp16 gradient overflowed and the step was skipped, else 0."""
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(opt)  # skipped when an fp16 gradient overflowed
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return int(scale is not None and scaler.get_scale() < scale)


def train_phase(client, phase, seed: int) -> float:
    """Trains what the client's method names for ``phase`` (an ``algorithms.Phase``, through
    ``Algorithm.train_target``) on the client's training slice; returns the mean training
    loss."""
    model, settings = client.task.model, client.settings
    target = client.algorithm.train_target(client, phase)
    for module in target.modules:
        module.train()
    opt = torch.optim.AdamW(target.params, lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = loss_scaler(model)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model.train()
    losses, skipped = [], 0
    for batch in batch_plan(len(client.fit), settings, gen):
        # backward inside the context: gradient checkpointing recomputes in there
        with target.batch_context():
            loss = client.task.loss([client.fit[i] for i in batch])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss in phase {phase.name}")
            scaler.scale(loss).backward()
        skipped += optimizer_step(opt, scaler)
        losses.append(loss.item())
    if skipped:
        log.warning("client %s, phase %s: %d of %d fp16 steps overflowed and were skipped "
                    "(loss scaling)", client.name, phase.name, skipped, len(losses))
    model.eval()
    set_trainable(model, "none")
    for module in target.modules:
        module.eval()
    return sum(losses) / max(len(losses), 1)
