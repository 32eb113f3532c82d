"""Shared helpers of the op tests: random inputs, the float64 oracle, per-dtype tolerances."""
from __future__ import annotations

import math

import torch

from feddpa_fast.kernels import reference

# (dtype, atol, rtol) for outputs and gradients against the float64 reference. atol is taken
# relative to the RMS of the reference tensor: gradients such as d lora_a sum over all M rows
# and grow with sqrt(M), so a fixed absolute tolerance would be loose for small tensors and
# tight for large ones.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def assert_close_scaled(actual, expected, dtype, what):
    """assert_close with the dtype's tolerances, atol scaled by the RMS of ``expected``."""
    atol, rtol = TOLERANCES[dtype]
    rms = expected.double().square().mean().sqrt().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               atol=atol * max(rms, 1e-6), rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def make_inputs(m_shape, k, n, r, dtype, *, bias=True, row_scale=True, seed=0,
                device="cpu", noncontig=False, dropout=0.0):
    """Random op inputs; m_shape is the leading shape of x (e.g. (67,) or (2, 5)).
    With ``noncontig`` x is a strided view (every other column of a wider tensor). With
    ``dropout`` they gain the in-op dropout pair (dropout_p, a seed tensor)."""
    gen = torch.Generator().manual_seed(seed)
    acc = reference.accum_dtype(dtype)

    def rand(*shape, std=1.0, out_dtype=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(
            device=device, dtype=out_dtype)

    m = math.prod(m_shape)
    if noncontig:
        x = rand(*m_shape, 2 * k)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = rand(*m_shape, k)
    inputs = {
        "x": x,
        "weight": rand(n, k, std=1 / math.sqrt(k)),
        "bias": rand(n, std=0.5) if bias else None,
        "lora_a": rand(r, k, std=1 / math.sqrt(k)),
        "lora_b": rand(n, r, std=1 / math.sqrt(max(r, 1))),
        "scale": rand(m if row_scale else 1, r, std=1.0, out_dtype=acc),
    }
    if dropout:
        inputs["dropout_p"] = dropout
        inputs["dropout_seed"] = torch.tensor(1_000_003 * (seed + 1), dtype=torch.int64,
                                              device=device)
    return inputs


GRAD_NAMES = ("x", "bias", "lora_a", "lora_b", "scale")


def run_with_grads(fn, inputs, dy, wanted=GRAD_NAMES):
    """Calls fn(**inputs) with requires_grad on ``wanted`` tensors; returns (y, {name: grad})."""
    leaves = {}
    call = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and name in wanted:
            value = value.detach().clone().requires_grad_(True)
            leaves[name] = value
        call[name] = value
    y = fn(**call)
    grads = torch.autograd.grad(y, list(leaves.values()), dy) if leaves else ()
    return y, dict(zip(leaves, grads))


def to_float64(inputs):
    """Floating-point tensors as float64; everything else (None, p, the seed) as given."""
    return {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in inputs.items()}


def assert_close_to_reference(fn, inputs, wanted=GRAD_NAMES, seed=1):
    """Output and every gradient of fn against reference.lora_linear run in float64."""
    dtype = inputs["x"].dtype
    gen = torch.Generator().manual_seed(seed)
    out_shape = (*inputs["x"].shape[:-1], inputs["weight"].shape[0])
    dy64 = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    y, grads = run_with_grads(fn, inputs, dy64.to(dtype), wanted)
    y_ref, grads_ref = run_with_grads(reference.lora_linear, to_float64(inputs), dy64, wanted)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close_scaled(y, y_ref, dtype, "output")
    assert set(grads) == set(grads_ref)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert_close_scaled(grad, grads_ref[name], dtype, f"gradient of {name}")
