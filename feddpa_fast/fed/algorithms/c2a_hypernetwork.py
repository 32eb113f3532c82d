"""C2A ("Client-customized adaptation", Kim et al. 2024) adapted to LoRA factors
(docs/ARCHITECTURE.md §4).

A small hypernetwork, shared by all clients and federated like an adapter, generates each
client's LoRA factors from a client embedding: the client's label distribution, the mean
context embedding of its data, and a learned per-layer embedding. The generated (A, B) run
through the same fused op as FedDPA's adapters (``GeneratedAdapters``, an adapter source), so
autograd flows from the task loss through the op into A and B and on into the hypernetwork.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...layers import dual_lora_layers

__all__ = ["AdapterHypernetwork", "GeneratedAdapters", "label_distribution",
           "lora_parameter_count", "uniform_label_distribution"]


def lora_parameter_count(layers, rank: int) -> int:
    """Parameters of ONE LoRA adapter over ``layers`` ((name, K, N) triples): sum r * (K + N)."""
    return sum(rank * (k + n) for _, k, n in layers)


class AdapterHypernetwork(nn.Module):
    """Generates ``{layer name: (A (rank, K), B (N, rank))}`` from (label_dist, context).

    Per layer l: ``c_l = E_label(label_dist) + e_l + P_ctx(context)``; ``h_l = MLP(c_l)``
    (Linear-GELU-Linear, shared by all layers). Factorised heads keep the generator small:
    ``A_l = rms_normalise(G_A(h_l)).view(rank, D) @ U_A[KxN] / sqrt(D)`` and
    ``B_l = V_B[KxN] @ G_B(h_l).view(D, rank)``, with the bases U_A (D, K) and V_B (N, D)
    learned and shared by all layers of one (K, N) shape.

    Init: G_B's weight and bias are zero, so B_l = 0 and the patched model starts equal to the
    base model (as LoRA does). A_l's coefficients are RMS-normalised, so A_l has the scale of
    U_A's rows whatever the conditioning: uniform(+-1/sqrt(K)) like LoRA's Kaiming init of A.
    (The conditioning steers A's direction and B's entries; A's magnitude is U_A's to learn.)

    Parameter count, with E = emb_dim, H = hidden, D = basis_dim, L = len(layers), r = rank:
        (num_labels + 1) E + L E + (context_dim + 1) E        embeddings and projections
      + (E + 1) H + (H + 1) H                                 shared MLP
      + 2 (H + 1) r D                                         G_A and G_B heads
      + sum over distinct (K, N) shapes of D (K + N)          bases U_A, V_B
    For MiniLM (12 layers 384x384, r 8, E 32, H 64, D 16, 4 labels, context 384): 48,064,
    against 73,728 for one rank-8 LoRA adapter over the same layers.
    """

    def __init__(self, layers: list[tuple[str, int, int]], rank: int, num_labels: int,
                 context_dim: int, *, emb_dim: int = 32, hidden: int = 64, basis_dim: int = 16):
        super().__init__()
        names = [name for name, _, _ in layers]
        if not layers or len(set(names)) != len(names):
            raise ValueError(f"layers must be a non-empty list of uniquely named layers, "
                             f"got {names}")
        for dim, what in ((rank, "rank"), (num_labels, "num_labels"), (context_dim, "context_dim"),
                          (emb_dim, "emb_dim"), (hidden, "hidden"), (basis_dim, "basis_dim"),
                          *((d, f"layer {n!r} size") for n, k, v in layers for d in (k, v))):
            if int(dim) < 1:
                raise ValueError(f"{what} must be a positive integer, got {dim}")
        self.layers = [(str(n), int(k), int(v)) for n, k, v in layers]
        self.rank, self.basis_dim = int(rank), int(basis_dim)
        self.num_labels, self.context_dim = int(num_labels), int(context_dim)
        self.label_proj = nn.Linear(num_labels, emb_dim)
        self.context_proj = nn.Linear(context_dim, emb_dim)
        # Same order of magnitude as the projections' outputs, so no term drowns the others.
        self.layer_emb = nn.Parameter(torch.randn(len(layers), emb_dim) / math.sqrt(emb_dim))
        self.mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head_a = nn.Linear(hidden, rank * basis_dim)
        self.head_b = nn.Linear(hidden, basis_dim * rank)
        nn.init.zeros_(self.head_b.weight)  # B = 0 at init: the model starts as the base model
        nn.init.zeros_(self.head_b.bias)
        self.basis_a, self.basis_b = nn.ParameterDict(), nn.ParameterDict()
        # Layers grouped by shape: one batched matmul per shape instead of one per layer.
        self._groups: dict[str, list[int]] = {}
        for i, (_, k, n) in enumerate(self.layers):
            key = f"{k}x{n}"
            self._groups.setdefault(key, []).append(i)
            if key not in self.basis_a:
                bound = 1.0 / math.sqrt(k)  # LoRA's A bound: kaiming_uniform(a=sqrt(5)), fan_in K
                self.basis_a[key] = nn.Parameter(torch.empty(basis_dim, k).uniform_(-bound, bound))
                # V_B must be non-zero: at init it is what carries the gradient to G_B.
                bound = 1.0 / math.sqrt(basis_dim)
                self.basis_b[key] = nn.Parameter(torch.empty(n, basis_dim).uniform_(-bound, bound))

    def forward(self, label_dist: torch.Tensor, context: torch.Tensor
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        ref = self.layer_emb
        label_dist = torch.as_tensor(label_dist).to(device=ref.device, dtype=ref.dtype)
        context = torch.as_tensor(context).to(device=ref.device, dtype=ref.dtype)
        if label_dist.shape != (self.num_labels,) or context.shape != (self.context_dim,):
            raise ValueError(f"expected label_dist ({self.num_labels},) and context "
                             f"({self.context_dim},), got {tuple(label_dist.shape)} and "
                             f"{tuple(context.shape)}")
        cond = self.label_proj(label_dist) + self.layer_emb + self.context_proj(context)  # (L, E)
        h = self.mlp(cond)
        r, d = self.rank, self.basis_dim
        coef_a = self.head_a(h).view(-1, r, d)
        # RMS-normalised per layer (eps: a zero row must not give NaN gradients).
        coef_a = coef_a * torch.rsqrt(coef_a.square().mean(dim=(1, 2), keepdim=True) + 1e-12)
        coef_b = self.head_b(h).view(-1, d, r)
        out: list = [None] * len(self.layers)
        for key, idx in self._groups.items():
            a = coef_a[idx] @ self.basis_a[key] / math.sqrt(d)  # (n, r, K)
            b = self.basis_b[key] @ coef_b[idx]                 # (n, N, r)
            for j, i in enumerate(idx):
                out[i] = (a[j], b[j])
        return {name: factors for (name, _, _), factors in zip(self.layers, out)}


def label_distribution(examples, num_labels: int) -> torch.Tensor:
    """Float32 (num_labels,): fraction of ``examples`` per label, indexed by the label's
    position in the (shared) ``choices`` tuple; slots past len(choices) are 0."""
    examples = list(examples)
    if not examples:
        raise ValueError("label_distribution needs at least one example")
    choices = examples[0].choices
    if any(ex.choices != choices for ex in examples):
        raise ValueError("all examples of a client must share one choices tuple")
    if len(choices) > num_labels:
        raise ValueError(f"{len(choices)} choices do not fit in num_labels={num_labels}")
    counts = torch.zeros(num_labels, dtype=torch.float32)
    for ex in examples:
        if ex.label not in choices:
            raise ValueError(f"label {ex.label!r} is not one of the choices {choices}")
        counts[choices.index(ex.label)] += 1
    return counts / len(examples)


def uniform_label_distribution(num_choices: int, num_labels: int) -> torch.Tensor:
    """1/num_choices on the first ``num_choices`` slots (test time: labels unknown, as in C2A)."""
    if not 1 <= num_choices <= num_labels:
        raise ValueError(f"num_choices must be in [1, {num_labels}], got {num_choices}")
    dist = torch.zeros(num_labels, dtype=torch.float32)
    dist[:num_choices] = 1.0 / num_choices
    return dist


class GeneratedAdapters:
    """An adapter source: generated factors ``{layer name: (A (r, K), B (N, r))}`` that every
    ``DualLoRALinear`` of ``model`` asks for while the ``with`` block runs, in place of both
    stacked adapters (the layer's precedence: merged > source > stacked, layers.py). Factors
    are cast to the layer's weight dtype/device (autograd flows through the cast), so an fp32
    hypernetwork can drive a half-precision model. Under a ``mix`` the generated branch gets
    the mix's weight when both weights are the same float (``mix(model, 0, 0)`` turns it off);
    any other mix raises at forward time, since one branch cannot take two weights.

    Raises (at construction, before anything changes): ValueError when the names do not match
    the patched layers, a factor's shape does not fit its layer, or ``scaling`` is not finite.
    """

    def __init__(self, model: nn.Module, factors: dict, scaling: float):
        self.layers = dual_lora_layers(model)
        names = {name for name, _ in self.layers}
        if not self.layers or names != set(factors):
            raise ValueError(f"factor names do not match the patched layers: missing "
                             f"{sorted(names - set(factors))}, "
                             f"unexpected {sorted(set(factors) - names)}")
        self.scaling = float(scaling)
        if not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be finite, got {scaling}")
        self._factors = {}
        for name, layer in self.layers:
            a, b = factors[name]
            k, n = layer.in_features, layer.out_features
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape[0] != n \
                    or b.shape[1] != a.shape[0]:
                raise ValueError(f"layer {name!r}: expected A (r, {k}) and B ({n}, r), got "
                                 f"A {tuple(a.shape)} and B {tuple(b.shape)}")
            weight = layer.base_layer.weight
            self._factors[name] = (a.to(device=weight.device, dtype=weight.dtype),
                                   b.to(device=weight.device, dtype=weight.dtype))
        self._previous: list = []

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) of the layer called ``name`` (what the layer asks for)."""
        a, b = self._factors[name]
        return a, b, self.scaling

    def __enter__(self):
        self._previous.append([layer.set_source((self, name)) for name, layer in self.layers])
        return self

    def __exit__(self, *exc):
        for (_, layer), previous in zip(self.layers, self._previous.pop()):
            layer.set_source(previous)
        return False
