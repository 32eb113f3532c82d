"""``DualLoRALinear``: a frozen linear layer plus a ``global`` and a ``local`` LoRA adapter,
run by the fused ``lora_linear`` op (docs/ARCHITECTURE.md §1, §2).

Parameter names follow PEFT (``lora_A.global.weight`` (r, K), ``lora_B.local.weight`` (N, r)),
with PEFT's initialisation (A Kaiming-uniform, B zeros) and ``scaling = alpha / r``.

In-place stacking. The op wants the branches stacked: ``lora_a`` (2r, K) with rows [0:r) global
and [r:2r) local, ``lora_b`` (N, 2r) with the columns stacked the same way. Concatenating them on
every call would copy both adapters per layer per step, so each adapter parameter is a *view*
of one stacked tensor per layer (``_stack_a``, ``_stack_b``); the forward hands the stacked
tensor to the op, and ``_StackedBranches`` routes its gradient back to the branch parameters
(slices, no copy). Anything that gives a parameter new storage (``.to()``, ``.half()``,
``load_state_dict(assign=True)``, ``deepcopy``) breaks the aliasing; ``_apply``, a
load-state-dict hook, ``__setstate__`` (deepcopy, unpickling) and the eager forward detect
that and re-stack. ``state_dict()`` holds contiguous copies of the adapter tensors, so
``save_pretrained`` / safetensors see ordinary, unshared tensors.

LoRA dropout (PEFT applies it to the input of the A branch only) runs inside the op: when
training with ``dropout > 0`` each forward draws a seed from torch's generator (one int64 on
x's device) and passes ``dropout_p`` and the seed; the kernel masks the A branch's operand and
the backward regenerates the mask, so no dropped copy of x is materialised or saved. Drawing
the seed from torch's generator makes ``torch.manual_seed`` (and the trainer's derived seeds)
reproduce the masks, and makes gradient checkpointing's recomputation, which restores the RNG
state, regenerate the same mask. Both adapters share one mask (PEFT draws one per adapter; the
expectation is the same).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ADAPTERS
from .kernels import lora_linear, lora_linear_banked, reference
from .layer_bank import ClientBankMixin
from .layer_scale import WEIGHT_NAMES, MixScaleMixin
from .precision import master_dtype

__all__ = ["DualLoRALinear", "is_supported_base", "dual_lora_layers", "WEIGHT_NAMES"]


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the layer usable without it
        return None
    return Conv1D


def is_supported_base(module: nn.Module) -> bool:
    """True for the layers ``DualLoRALinear`` can wrap: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def dual_lora_layers(model: nn.Module) -> list[tuple[str, DualLoRALinear]]:
    """``(name, layer)`` for every ``DualLoRALinear`` inside ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DualLoRALinear)]


def _float_zero(weight) -> bool:
    """A mix weight that is a Python number equal to 0 (a tensor never counts: its values
    would have to be read, and a 0-d tensor may carry a gradient)."""
    return isinstance(weight, (int, float)) and weight == 0


def _contiguous_adapter_state(module, state_dict, prefix, local_metadata):
    """state_dict hook: adapter entries as contiguous copies (not views of the stacks), so
    that savers which reject shared or strided storage (safetensors, save_pretrained) work."""
    for key in list(state_dict):
        if key.startswith(prefix + "lora_"):
            state_dict[key] = state_dict[key].detach().clone(memory_format=torch.contiguous_format)


def _restack_after_load(module, incompatible_keys):
    """load_state_dict post-hook (a module-level function, so the layer stays picklable)."""
    module._restack()


class _StackedBranches(torch.autograd.Function):
    """Returns ``stack`` (which the ``branches`` are views of) with autograd to the branches.

    Forward is free (an alias of the stacked storage); backward splits the gradient of the
    stacked tensor into one slice per branch along ``dim``.
    """

    @staticmethod
    def forward(ctx, stack, dim, *branches):
        ctx.dim = dim
        ctx.sizes = [b.shape[dim] for b in branches]
        # Saved only for autograd's version check: an in-place edit of a branch between
        # forward and backward then raises, as it would for nn.Linear (no extra memory).
        ctx.save_for_backward(*branches)
        return stack.view_as(stack)

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # noqa: B018  (raises if a branch was modified in place)
        parts = grad.split(ctx.sizes, dim=ctx.dim)
        needs = ctx.needs_input_grad[2:]
        return (None, None, *[p if need else None for p, need in zip(parts, needs)])


class DualLoRALinear(ClientBankMixin, MixScaleMixin, nn.Module):
    """``base_layer(x)`` plus ``w_g * s * B_g A_g x + w_l * s * B_l A_l x`` in one fused op.

    ``w_g`` / ``w_l`` are the current mix weights (``feddpa_fast.mix``): floats, tensors of
    shape (batch,) giving each sequence of the batch its own weights, or (batch, seq_len) giving
    each token its own; rows of the input map to sequences by the rule of ``feddpa_fast.rows``
    (beams, samples and flattened inputs included). Outside any ``mix`` both are 1.0 (both
    adapters fully on, as PEFT with two active adapters).

    A drop-in for the wrapped module where model code reads its attributes: ``weight`` and
    ``bias`` are the base layer's own tensors (so ``layer.weight.dtype`` checks, as T5's feed
    forward does, see the frozen weight), ``in_features`` / ``out_features`` its sizes.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        if not is_supported_base(base_layer):
            raise TypeError(f"DualLoRALinear wraps nn.Linear or transformers' Conv1D, "
                            f"not {type(base_layer).__name__}")
        self.base_layer = base_layer
        # GPT-2's Conv1D keeps its weight as (in, out): the op reads it through a transposed view.
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        out_features, in_features = (weight.shape[::-1] if self.fan_in_fan_out else weight.shape)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r = {name: r for name in ADAPTERS}
        self.lora_alpha = {name: alpha for name in ADAPTERS}
        self.scaling = {name: alpha / r for name in ADAPTERS}
        self.dropout_p = float(dropout)
        # fp32 masters under a half-precision base (feddpa_fast/precision.py).
        factory = {"device": weight.device, "dtype": master_dtype(weight.dtype)}
        self.lora_A = nn.ModuleDict(
            {n: nn.Linear(self.in_features, r, bias=False, **factory) for n in ADAPTERS})
        self.lora_B = nn.ModuleDict(
            {n: nn.Linear(r, self.out_features, bias=False, **factory) for n in ADAPTERS})
        for name in ADAPTERS:  # PEFT's init_lora_weights=True
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        self.mix_weights: tuple = (1.0, 1.0)
        # Set by ``mix`` to one dict shared by all layers of the model: layers with the same
        # input shape, ranks and scalings share one scale tensor (built once, saved once for
        # backward) instead of building M x R floats each (7 MB over 28 layers in the model
        # benchmark).
        self._scale_cache: dict | None = None
        # Set by ``mix`` to one dict shared by all layers: {"positions": P} of the current model
        # call when per-token weights are active (how a flattened 2-D input maps to tokens), and
        # {"clients": (batch, 2) bank slots} under ``mix(..., clients=...)`` (else None).
        self._mix_call: dict | None = None
        # (source, layer name) while an adapter source is attached (``set_source``): the layer
        # asks ``source.factors(name)`` for its (A, B, scaling) instead of using the stacks
        # (C2A's generated adapters, feddpa_fast.fed.algorithms.c2a_hypernetwork.GeneratedAdapters).
        self.source: tuple | None = None
        # (router,) while ``feddpa_fast.route`` runs: a Linear(in_features, 2) whose softmax
        # gives each row its two weights (routing.py). A tuple, so that the router is not
        # registered as a submodule (state_dict and parameters() stay the adapters').
        self._router: tuple | None = None
        self.merged = False
        # Several clients' adapters (feddpa_fast.client_bank): the bank lora_linear_banked reads,
        # slot 0 the shared global; the name -> (global slot, local slot) registry is one dict
        # shared by every layer of the model. Non-persistent: .to() moves the bank, state_dict()
        # leaves it out.
        self.register_buffer("client_bank_a", None, persistent=False)
        self.register_buffer("client_bank_b", None, persistent=False)
        self.client_scaling: list[float] = []
        self.client_slots: dict = {}
        # Set by ``feddpa_fast.client_adapters`` for its block (client_training.py): a
        # (slots, 2, K) bank of per-client routers, and a callable giving a banked call's
        # per-slot dropout seeds from each client's own generator.
        self.client_routers: torch.Tensor | None = None
        self.client_seed_source = None
        self._restack()
        self._register_state_dict_hook(_contiguous_adapter_state)
        self.register_load_state_dict_post_hook(_restack_after_load)

    # ---- stacked storage -------------------------------------------------------------------
    def _branch_params(self):
        return ([self.lora_A[n].weight for n in ADAPTERS],
                [self.lora_B[n].weight for n in ADAPTERS])

    def _restack(self) -> None:
        """(Re)builds the stacked tensors from the current parameter values and makes every
        branch parameter a view of them again."""
        a_params, b_params = self._branch_params()
        with torch.no_grad():
            stack_a = torch.cat([p.detach() for p in a_params], dim=0)
            stack_b = torch.cat([p.detach() for p in b_params], dim=1)
        rows = 0
        for p_a, p_b in zip(a_params, b_params):
            r = p_a.shape[0]
            p_a.data = stack_a[rows:rows + r]
            p_b.data = stack_b[:, rows:rows + r]
            rows += r
        self._stack_a, self._stack_b = stack_a, stack_b

    def _stack_intact(self) -> bool:
        a_params, b_params = self._branch_params()
        stack_a, stack_b = self._stack_a, self._stack_b
        rows = 0
        for p_a, p_b in zip(a_params, b_params):
            if (p_a.untyped_storage().data_ptr() != stack_a.untyped_storage().data_ptr()
                    or p_b.untyped_storage().data_ptr() != stack_b.untyped_storage().data_ptr()
                    or p_a.storage_offset() != stack_a.storage_offset() + rows * stack_a.stride(0)
                    or p_b.storage_offset() != stack_b.storage_offset() + rows
                    or p_a.dtype != stack_a.dtype):
                return False
            rows += p_a.shape[0]
        return True

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if not self._stack_intact():  # .to() / .half() gave each parameter its own storage
            self._restack()           # (share_memory_() keeps the views: nothing to do)
        return module

    def __setstate__(self, state):
        super().__setstate__(state)
        self._restack()  # deepcopy / unpickling copied each parameter on its own

    def _stacked_adapters(self):
        stack_a, stack_b = self._stack_a, self._stack_b
        if not torch.is_grad_enabled():  # checked first: inference skips the parameter walk
            return stack_a, stack_b
        a_params, b_params = self._branch_params()
        if not any(p.requires_grad for p in a_params + b_params):
            return stack_a, stack_b
        return (_StackedBranches.apply(stack_a, 0, *a_params),
                _StackedBranches.apply(stack_b, 1, *b_params))

    # ---- drop-in attributes ----------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's frozen weight, as stored there ((in, out) for GPT-2's Conv1D)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias (None when it has none)."""
        return self.base_layer.bias

    # ---- state set from outside: the mix and the adapter source ----------------------------
    def set_mix(self, weights: tuple, scale_cache: dict | None, call: dict | None) -> tuple:
        """Sets the mix weights, the model-wide scale cache and call record (``mixing.mix``
        calls this for every layer); returns the previous triple, to restore it."""
        previous = (self.mix_weights, self._scale_cache, self._mix_call)
        self.mix_weights, self._scale_cache, self._mix_call = weights, scale_cache, call
        return previous

    def set_source(self, source: tuple | None) -> tuple | None:
        """Attaches ``(source, name)`` (an object with ``factors(name) -> (A, B, scaling)``)
        or detaches (None); returns the previous one."""
        previous, self.source = self.source, source
        return previous

    def set_router(self, router: nn.Module | None) -> nn.Module | None:
        """Attaches a per-token router (``feddpa_fast.route``) or detaches (None); returns the
        previous one."""
        previous = self._router[0] if self._router else None
        self._router = None if router is None else (router,)
        return previous

    # ---- forward ---------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as the op wants it, (out, in); a transposed view for Conv1D."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def _source_operands(self, x: torch.Tensor):
        """(A, B, scale) of the attached source: one branch, weighted by the mix when both of
        its weights are the same float (the default (1, 1) keeps it at full strength)."""
        source, name = self.source
        lora_a, lora_b, scaling = source.factors(name)
        global_w, local_w = self.mix_weights
        if isinstance(global_w, torch.Tensor) or isinstance(local_w, torch.Tensor) \
                or global_w != local_w:
            raise ValueError("an attached adapter source (a generated adapter) is one branch: "
                             "a mix must give global_w and local_w the same float, got "
                             f"{global_w!r} and {local_w!r}")
        scale = torch.full((1, lora_a.shape[0]), float(global_w) * float(scaling),
                           dtype=reference.accum_dtype(x.dtype), device=x.device)
        return lora_a, lora_b, scale

    def _stacked_operands(self, x: torch.Tensor):
        """(stacked A, stacked B, scale) of the adapters under the current mix: both, or only
        the one whose weight is not a float 0."""
        if not torch.compiler.is_compiling() and not self._stack_intact():
            self._restack()  # a parameter got new storage (deepcopy, assign=True, ...)
        lora_a, lora_b = self._stacked_adapters()
        live = [i for i, w in enumerate(self.mix_weights) if not _float_zero(w)]
        if len(live) == len(ADAPTERS):
            return lora_a, lora_b, self._scale(x)
        # One branch at a float weight of 0 is skipped, not computed at scale 0: FedIT's and
        # local-only's evaluation and every single-adapter training phase do half the rank
        # work. (A tensor of zeros is still computed: its values are not looked at.) The live
        # branch's columns of the full scale: any weight kind (float, per sequence, per token,
        # a 0-d tensor with a gradient) keeps its rows and its graph; the op reads the views.
        (i,) = live
        start = sum(self.r[n] for n in ADAPTERS[:i])
        cols = slice(start, start + self.r[ADAPTERS[i]])
        return lora_a[cols], lora_b[:, cols], self._scale(x)[:, cols]

    def _adapters_off(self) -> bool:
        """Both mix weights are float 0 (``mix(model, 0, 0)``): the layer is its base layer."""
        return all(_float_zero(w) for w in self.mix_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Precedence: a merged layer is its base layer (the mix is folded in), and so is a
        # layer whose two weights are float 0 (outside a clients mix); a clients mix runs the
        # bank (one adapter pair per sequence); an attached source replaces both adapters;
        # otherwise the stacked adapters under the mix.
        clients = self._mix_call.get("clients") if self._mix_call else None
        if self.merged or (clients is None and self._adapters_off()):
            return self.base_layer(x)
        if self._router is not None and (clients is not None or self.source is not None):
            raise ValueError("a routed layer (feddpa_fast.route) runs the model's own two "
                             "adapters: not a client bank (mix(..., clients=...)) nor an "
                             "attached adapter source")
        if clients is not None:
            lora_a, lora_b, index, scale = self._banked_operands(x, clients)
        elif self.source is not None:
            lora_a, lora_b, scale = self._source_operands(x)
        else:
            lora_a, lora_b, scale = self._stacked_operands(x)
        weight, bias = self.base_weight(), self.base_layer.bias
        if torch.is_autocast_enabled(x.device.type):
            # The op is not on autocast's lists: cast as autocast casts F.linear's operands
            # (gradients flow back through the casts to the fp32 adapters).
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
            bias = bias.to(dtype) if bias is not None else None
        elif lora_a.dtype != x.dtype:
            # fp32 masters under a bf16 / fp16 base: the op computes in the base dtype (fp32
            # accumulation); the casts' backward hands the masters their gradients.
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        dropout = {}
        if self.training and self.dropout_p > 0:
            # One seed per call, or per bank slot: each client its own mask stream (from its
            # own generator when client_adapters gave one).
            if clients is not None and self.client_seed_source is not None:
                seed = self.client_seed_source(x.device)
            else:
                seed = self._dropout_seeds(x.device, 1 if clients is None else lora_a.shape[0])
            dropout = {"dropout_p": self.dropout_p, "dropout_seed": seed}
        if clients is not None:
            return lora_linear_banked(x, weight, bias, lora_a, lora_b, index, scale, **dropout)
        return lora_linear(x, weight, bias, lora_a, lora_b, scale, **dropout)

    @staticmethod
    def _dropout_seeds(device: torch.device, count: int) -> torch.Tensor:
        """``count`` int64s from torch's generator of ``device``: the in-op dropout masks'
        seeds."""
        return torch.randint(0, 2**62, (count,), dtype=torch.int64, device=device)

    # ---- merging ---------------------------------------------------------------------------
    def delta_weight(self, global_w: float, local_w: float) -> torch.Tensor:
        """``sum_b w_b * s_b * B_b A_b`` in fp32, shaped like ``base_layer.weight``."""
        delta = None
        for w, name in zip((global_w, local_w), ADAPTERS):
            a = self.lora_A[name].weight.detach().float()
            b = self.lora_B[name].weight.detach().float()
            term = (b @ a) * (float(w) * self.scaling[name])
            delta = term if delta is None else delta + term
        return delta.t() if self.fan_in_fan_out else delta

    def merge(self, global_w: float, local_w: float) -> None:
        """Folds the mix into the base weight; keeps the original for an exact ``unmerge``."""
        if self.merged:
            raise ValueError("layer is already merged; call unmerge() first")
        delta = self.delta_weight(global_w, local_w)
        if not torch.isfinite(delta).all():
            raise ValueError("merge: the adapters give a non-finite weight delta; nothing merged")
        weight = self.base_layer.weight
        merged = (weight.detach().float() + delta).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError("merge: the merged weight is not finite in the base dtype; "
                             "nothing merged")
        self._unmerged_weight = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """Restores the base weight saved by ``merge`` (bit for bit)."""
        if not self.merged:
            raise ValueError("layer is not merged")
        with torch.no_grad():
            self.base_layer.weight.copy_(self._unmerged_weight)
        del self._unmerged_weight
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r['global']}, alpha={self.lora_alpha['global']}, "
                f"dropout={self.dropout_p}, fan_in_fan_out={self.fan_in_fan_out}")
