"""Python-side registrations of the ``feddpa::lora_linear`` op family.

The native library (kernels/cpu/ops.cpp) defines the schemas, the C++ autograd kernel and the
CPU kernels. Here:
- fake (meta) kernels, so ``torch.compile(fullgraph=True)`` traces a module calling the op;
- kernels for every other device: the reference formulas, registered as
  ``CompositeExplicitAutograd`` (a device-specific kernel, such as the native CPU one or the
  Triton CUDA one, takes precedence over it).
"""
from __future__ import annotations

import torch

from . import reference, reference_banked


def _out_shape(x, weight):
    return (*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("feddpa::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0,
                      dropout_seed=None):
    torch.ops.feddpa.lora_linear_check(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                       dropout_seed)
    return x.new_empty(_out_shape(x, weight))


@torch.library.register_fake("feddpa::lora_linear_fwd")
def _lora_linear_fwd_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0,
                          dropout_seed=None):
    torch.ops.feddpa.lora_linear_check(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                       dropout_seed)
    u = x.new_empty((_leading_rows(x), lora_a.shape[0]), dtype=reference.accum_dtype(x.dtype))
    return x.new_empty(_out_shape(x, weight)), u


def _leading_rows(x):
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    return rows


@torch.library.register_fake("feddpa::lora_linear_bwd")
def _lora_linear_bwd_fake(dy, x, weight, lora_a, lora_b, scale, u, output_mask,
                          dropout_p=0.0, dropout_seed=None):
    need_dx, need_da, need_db, need_ds = output_mask
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_dx else empty,
        lora_a.new_empty(lora_a.shape) if need_da else empty,
        lora_b.new_empty(lora_b.shape) if need_db else empty,
        scale.new_empty(scale.shape) if need_ds else scale.new_empty(0),
    )


@torch.library.impl("feddpa::lora_linear", "CompositeExplicitAutograd")
def _lora_linear_other_device(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0,
                              dropout_seed=None):
    return _lora_linear_fwd_other_device(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                         dropout_seed)[0]


@torch.library.impl("feddpa::lora_linear_fwd", "CompositeExplicitAutograd")
def _lora_linear_fwd_other_device(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0,
                                  dropout_seed=None):
    torch.ops.feddpa.lora_linear_check(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                       dropout_seed)
    return reference.lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                         dropout_seed)


@torch.library.impl("feddpa::lora_linear_bwd", "CompositeExplicitAutograd")
def _lora_linear_bwd_other_device(dy, x, weight, lora_a, lora_b, scale, u, output_mask,
                                  dropout_p=0.0, dropout_seed=None):
    return reference.lora_linear_backward(dy, x, weight, lora_a, lora_b, scale, u, output_mask,
                                          dropout_p, dropout_seed)


# The banked op (rows of one call use different adapters: kernels/reference_banked.py).

@torch.library.register_fake("feddpa::lora_linear_banked")
def _banked_fake(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0,
                 dropout_seed=None):
    torch.ops.feddpa.lora_linear_banked_check(x, weight, bias, bank_a, bank_b, index, scale,
                                              dropout_p, dropout_seed)
    return x.new_empty(_out_shape(x, weight))


@torch.library.register_fake("feddpa::lora_linear_banked_fwd")
def _banked_fwd_fake(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0,
                     dropout_seed=None):
    torch.ops.feddpa.lora_linear_banked_check(x, weight, bias, bank_a, bank_b, index, scale,
                                              dropout_p, dropout_seed)
    u = x.new_empty((_leading_rows(x), scale.shape[1]), dtype=reference.accum_dtype(x.dtype))
    return x.new_empty(_out_shape(x, weight)), u


@torch.library.register_fake("feddpa::lora_linear_banked_bwd")
def _banked_bwd_fake(dy, x, weight, bank_a, bank_b, index, scale, u, output_mask,
                     dropout_p=0.0, dropout_seed=None):
    need_dx, need_da, need_db, need_ds = output_mask
    empty = x.new_empty(0)
    return (
        x.new_empty(x.shape) if need_dx else empty,
        bank_a.new_empty(bank_a.shape) if need_da else empty,
        bank_b.new_empty(bank_b.shape) if need_db else empty,
        scale.new_empty(scale.shape) if need_ds else scale.new_empty(0),
    )


@torch.library.impl("feddpa::lora_linear_banked", "CompositeExplicitAutograd")
def _banked_other_device(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0,
                         dropout_seed=None):
    return _banked_fwd_other_device(x, weight, bias, bank_a, bank_b, index, scale, dropout_p,
                                    dropout_seed)[0]


@torch.library.impl("feddpa::lora_linear_banked_fwd", "CompositeExplicitAutograd")
def _banked_fwd_other_device(x, weight, bias, bank_a, bank_b, index, scale, dropout_p=0.0,
                             dropout_seed=None):
    torch.ops.feddpa.lora_linear_banked_check(x, weight, bias, bank_a, bank_b, index, scale,
                                              dropout_p, dropout_seed)
    torch.ops.feddpa.lora_linear_banked_check_index(index, bank_a.shape[0])
    return reference_banked.lora_linear_banked_forward(x, weight, bias, bank_a, bank_b, index,
                                                       scale, dropout_p, dropout_seed)


@torch.library.impl("feddpa::lora_linear_banked_bwd", "CompositeExplicitAutograd")
def _banked_bwd_other_device(dy, x, weight, bank_a, bank_b, index, scale, u, output_mask,
                             dropout_p=0.0, dropout_seed=None):
    return reference_banked.lora_linear_banked_backward(dy, x, weight, bank_a, bank_b, index,
                                                        scale, u, output_mask, dropout_p,
                                                        dropout_seed)
