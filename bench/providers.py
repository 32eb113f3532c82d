"""The providers every op benchmark compares, built on one random problem:

    base      F.linear(x, W, b): the frozen GEMM alone, the floor
    unfused   PEFT-style PyTorch: base output plus, per branch, lora_B(lora_A(x)) * scaling * w
              added out of place (w: per-row mix weight, as FedDPA needs)
    peft      a real peft LoRA layer holding two adapters, both active (static weights: PEFT
              has no per-instance mix)
    two_gemm  LoRAFusion's split (Triton): a shrink kernel, then a GEMM whose accumulator
              also takes (u*S) B^T (kernels/triton_split.py); on plain CPU, torch's
              shrink + addmm_ into the base output
    fused_pertile
              the previous single launch, one program per output tile (Triton only)
    fused     feddpa_fast.kernels.lora_linear

With LoRA dropout p (``build_providers(..., dropout=p)``; a fresh mask every call):
    fused_dropout     the op's in-op dropout (dropout_p, a seed drawn per call, as the layer)
    materialised_dropout
                      the baseline from public pieces: the dropped copy F.dropout(x, p)
                      materialised, the A branch reading it (torch ops over the stacked
                      adapters and the per-row scale), the frozen GEMM reading x
    peft_dropout      the peft layer with lora_dropout = p (one mask per adapter)

Modes: "forward", "fwd+bwd" and "backward" (backward: dx plus the adapter gradients; for base,
dx only; in "backward" mode the forward runs once, outside the timing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from feddpa_fast.kernels import lora_linear


@dataclass
class Problem:
    """Inputs of one benchmark case: r adapters per branch, two branches (global, local)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    a: list[torch.Tensor]       # per branch (r, K)
    b: list[torch.Tensor]       # per branch (N, r)
    mix: list[torch.Tensor]     # per branch (M, 1) float32 per-row weights
    scaling: float
    dy: torch.Tensor

    @property
    def shape(self):
        return self.x.shape[0], self.x.shape[1], self.weight.shape[0], self.a[0].shape[0]


def make_problem(m, k, n, r, dtype=torch.float32, device="cpu", seed=0) -> Problem:
    """Random inputs (never zeros: B is random too, so no branch is trivially skipped)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    mix_g = torch.rand(m, 1, generator=gen).to(device)
    return Problem(
        x=rand(m, k),
        weight=rand(n, k, std=1 / math.sqrt(k)),
        bias=rand(n, std=0.1),
        a=[rand(r, k, std=1 / math.sqrt(k)) for _ in range(2)],
        b=[rand(n, r, std=0.1) for _ in range(2)],
        mix=[mix_g, 1 - mix_g],
        scaling=2.0,
        dy=rand(m, n),
    )


def flops(m, k, n, r, mode, provider) -> float:
    """Analytic FLOPs of one call (two branches of rank r; base does only its own GEMM)."""
    base_fwd = 2.0 * m * n * k
    base_dx = 2.0 * m * n * k
    lora_fwd = 2.0 * m * (2 * r) * (k + n)
    lora_bwd = 2 * 2.0 * m * (2 * r) * (k + n)  # g, dB over N; dx-lora, dA over K
    if provider == "base":
        fwd, bwd = base_fwd, base_dx
    else:
        fwd, bwd = base_fwd + lora_fwd, base_dx + lora_bwd
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


def _peft_layer(p: Problem, dropout: float = 0.0):
    """A real peft LoRA model around one nn.Linear, adapters 'global' and 'local' both active."""
    from peft import LoraConfig, get_peft_model

    n, k = p.weight.shape
    r = p.a[0].shape[0]

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(k, n, device=p.x.device, dtype=p.x.dtype)

        def forward(self, inp):
            return self.proj(inp)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(p.weight)
        holder.proj.bias.copy_(p.bias)
    cfg = LoraConfig(r=r, lora_alpha=int(p.scaling * r), lora_dropout=dropout,
                     target_modules=["proj"])
    model = get_peft_model(holder, cfg, adapter_name="global")
    model.add_adapter("local", cfg)
    model.base_model.set_adapter(["global", "local"])
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i, name in enumerate(("global", "local")):
            layer.lora_A[name].weight.copy_(p.a[i])
            layer.lora_B[name].weight.copy_(p.b[i])
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def _run_once(forward, params, train: bool, dy):
    """One call: the forward alone (no grad), or forward + backward with fresh gradients."""
    if not train:
        with torch.no_grad():
            return forward()
    for t in params:
        t.grad = None
    forward().backward(dy)


def _backward_step(forward, params, dy):
    """The forward run once now; the callable times its backward (graph retained)."""
    y = forward()

    def step():
        for t in params:
            t.grad = None
        y.backward(dy, retain_graph=True)
    return step


def build_providers(p: Problem, mode: str, names: list[str], *, backward_only: bool = False,
                    return_output: bool = False, fused_backend: str | None = None,
                    dropout: float = 0.05) -> dict:
    """Callables running one call of each provider on problem p in ``mode``.

    ``backward_only``: run the forward once now and time only ``backward`` (graph retained).
    ``return_output``: the callables return the forward output (for accuracy checks).
    ``fused_backend``: force the fused op's backend (the GPU script's CPU dry run: "triton").
    ``dropout``: p of the three dropout providers (the others have none)."""
    train = mode in ("fwd+bwd", "backward")
    x = p.x.detach().clone().requires_grad_(train)
    w, bias = p.weight, p.bias
    a = [t.detach().clone().requires_grad_(train) for t in p.a]
    b = [t.detach().clone().requires_grad_(train) for t in p.b]
    # The fused op reads both branches from one stacked buffer (what DualLoRALinear keeps).
    a_st = torch.cat(p.a).detach().requires_grad_(train)
    b_st = torch.cat(p.b, dim=1).detach().requires_grad_(train)
    r = p.a[0].shape[0]
    scale = torch.cat([(p.scaling * m).expand(-1, r) for m in p.mix], dim=1).contiguous()
    row_w = [(p.scaling * m).to(p.x.dtype) for m in p.mix]

    impls = {
        "base": (lambda: F.linear(x, w, bias), [x]),
        "unfused": (lambda: F.linear(x, w, bias)
                    + F.linear(F.linear(x, a[0]), b[0]) * row_w[0]
                    + F.linear(F.linear(x, a[1]), b[1]) * row_w[1], [x, *a, *b]),
        "two_gemm": (lambda: _two_gemm(x, w, bias, a_st, b_st, scale), [x, a_st, b_st]),
        "fused_pertile": (lambda: _triton_alternative("pertile")(x, w, bias, a_st, b_st, scale),
                          [x, a_st, b_st]),
        "fused": (lambda: lora_linear(x, w, bias, a_st, b_st, scale, backend=fused_backend),
                  [x, a_st, b_st]),
        "fused_dropout": (lambda: lora_linear(
            x, w, bias, a_st, b_st, scale, dropout_p=dropout, backend=fused_backend,
            dropout_seed=torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)),
            [x, a_st, b_st]),
        "materialised_dropout": (lambda: materialised_dropout(x, w, bias, a_st, b_st, scale,
                                                              dropout), [x, a_st, b_st]),
    }
    owned = {n: [x, w, bias, *params] for n, (_, params) in impls.items()}
    for name, p_drop in (("peft", 0.0), ("peft_dropout", dropout)):
        if name in names:
            model = _peft_layer(p, p_drop).train()
            params = [t for t in model.parameters() if t.requires_grad] + [x]
            impls[name] = (lambda m=model: m(x), params)
            owned[name] = [x, *model.parameters()]
    if return_output:
        return {n: impls[n][0] for n in names}
    if backward_only:
        return {n: _backward_step(*impls[n], p.dy) for n in names}
    fns = {n: (lambda f=impls[n][0], ps=impls[n][1]: _run_once(f, ps, train, p.dy))
           for n in names}
    for n, fn in fns.items():
        fn.owned = owned[n]  # the provider's inputs and parameters (saved_bytes skips them)
    return fns


def _triton_kernels_run(x) -> bool:
    from feddpa_fast.kernels.triton_config import interpreting
    return x.device.type == "cuda" or interpreting()


def materialised_dropout(x, w, bias, a_st, b_st, scale, p: float):
    """y = x W^T + b + ((dropout(x) A^T) * S) B^T with the dropped copy materialised: what a
    layer without in-op dropout runs (u in fp32, scaled, cast once, as the op)."""
    x2 = x.reshape(-1, x.shape[-1])
    # fp32 masters under a half-precision base compute in the base dtype, as the layer does
    a_st, b_st = a_st.to(x.dtype), b_st.to(x.dtype)
    u = F.linear(F.dropout(x2, p, training=True), a_st).float()
    y = F.linear(x2, w, bias) + (u * scale).to(x.dtype) @ b_st.T
    return y.view(*x.shape[:-1], w.shape[0])


def _triton_alternative(name):
    """lora_linear through a kept alternative forward with the regular backward, through the
    op's one autograd (kernels/triton_op.py, ``serving``)."""
    from feddpa_fast.kernels import lora_linear, triton_op

    def op(x, w, bias, a_st, b_st, scale):
        with triton_op.serving(x.device.type, forward=triton_op.alternative_forward(name)):
            return lora_linear(x, w, bias, a_st, b_st, scale)
    return op


def _two_gemm(x, w, bias, a_st, b_st, scale):
    """The split: Triton's two launches where Triton runs, else shrink, scale in fp32, then
    addmm_ the expand into the base output (autograd-safe: linear's backward does not need
    its output)."""
    if _triton_kernels_run(x):
        return _triton_alternative("split")(x, w, bias, a_st, b_st, scale)
    us = (F.linear(x, a_st).float() * scale).to(x.dtype)
    return F.linear(x, w, bias).addmm_(us, b_st.T)


def saved_bytes(p: Problem, name: str, **kwargs) -> int:
    """Bytes autograd saves for backward in one fwd+bwd call of provider ``name``: unique
    storages, the provider's own inputs and parameters excluded (they exist anyway)."""
    fn = build_providers(p, "fwd+bwd", [name], **kwargs)[name]
    owned = {t.untyped_storage().data_ptr() for t in fn.owned}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())
