"""The Triton kernels (forward, split-K decode forward, fused backward) run in Triton's CPU
interpreter against the float64 reference: outputs and every gradient. fp32 and fp16 directly;
bf16 through the documented upcast path (the interpreter's bf16 dot is wrong). One fixed tile
config (autotuning and timing need a GPU)."""
import itertools
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from feddpa_fast.kernels import lora_linear  # noqa: E402
from feddpa_fast.kernels.triton_config import fwd_config, interpreting, padded_rank  # noqa: E402
from op_cases import assert_close_scaled, assert_close_to_reference, make_inputs  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests: CPU only")

MS = [(1,), (3,), (67,)]
KN = [(48, 40), (80, 96)]
RS = [8, 16, 48]  # 8 and 48 are padded to 16 and 64
CASES = [(m, k, n, r, i % 2 == 0, i % 3 != 0)
         for i, (m, (k, n), r) in enumerate(itertools.product(MS, KN, RS))]


def triton_backend(**kw):
    y = lora_linear(**kw, backend="triton")
    assert type(y.grad_fn).__name__ in ("TritonLoraLinearBackward", "NoneType")
    return y


def test_interpreter_is_on():
    assert interpreting()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m_shape,k,n,r,row_scale,bias", CASES)
def test_outputs_and_gradients_match_reference(dtype, m_shape, k, n, r, row_scale, bias):
    inputs = make_inputs(m_shape, k, n, r, dtype, bias=bias, row_scale=row_scale)
    assert_close_to_reference(triton_backend, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lora_input", [False, True])
def test_three_d_and_row_strided_input(dtype, lora_input):
    inputs = make_inputs((2, 9), 48, 40, 8, dtype, lora_input=lora_input)
    for name, width in (("x", 80), ("lora_input", 64)):
        if name in inputs:
            wide = torch.randn(2, 9, width, dtype=dtype)
            wide[..., :48] = inputs[name]
            inputs[name] = wide[..., :48]  # rows strided by `width`: read in place
            assert inputs[name].stride(-1) == 1 and not inputs[name].is_contiguous()
    assert_close_to_reference(triton_backend, inputs)


# lora_input (LoRA dropout): the A branch reads its own input; dx = dy W, d lora_input = gs A.
LORA_INPUT_CASES = [((1,), 48, 40, 8, False, False), ((3,), 80, 96, 16, True, True),
                    ((67,), 48, 40, 48, True, False), ((2, 5), 80, 96, 8, False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m_shape,k,n,r,row_scale,bias", LORA_INPUT_CASES)
def test_lora_input_matches_reference(dtype, m_shape, k, n, r, row_scale, bias):
    inputs = make_inputs(m_shape, k, n, r, dtype, bias=bias, row_scale=row_scale,
                         lora_input=True)
    assert_close_to_reference(triton_backend, inputs)


@pytest.mark.parametrize("wanted", [("lora_input",), ("x",), ("lora_a", "scale"),
                                    ("x", "lora_input", "bias")])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_input_only_requested_gradients(wanted, bias):
    inputs = make_inputs((5,), 48, 40, 16, torch.float32, bias=bias, lora_input=True)
    assert_close_to_reference(triton_backend, inputs, wanted=wanted)


@pytest.mark.parametrize("wanted", [("lora_a", "lora_b"), ("x",), ("scale",), ("x", "bias")])
def test_only_requested_gradients(wanted):
    inputs = make_inputs((5,), 48, 40, 16, torch.float32)
    assert_close_to_reference(triton_backend, inputs, wanted=wanted)


@pytest.mark.parametrize("split_k,lora_input", [(2, False), (3, False), (2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_decode_forward(split_k, dtype, lora_input):
    from feddpa_fast.kernels import reference, triton_forward
    inputs = make_inputs((3,), 80, 96, 16, dtype, row_scale=False, lora_input=lora_input)
    cfg = fwd_config(3, 96, 80, 16, torch.device("cpu"), split_k=split_k)
    cfg = cfg.__class__(16, 32, 16, cfg.block_r, split_k=split_k)  # 5 K blocks over the slices
    y, u = triton_forward.forward(**inputs, cfg=cfg)
    y_ref, u_ref = reference.lora_linear_forward(
        **{k: (v.double() if v is not None else None) for k, v in inputs.items()})
    assert y.dtype == dtype and u.dtype == torch.float32
    assert_close_scaled(y, y_ref, dtype, "split-K output")
    assert_close_scaled(u, u_ref, dtype, "split-K u")


def test_rank_padding():
    assert [padded_rank(r) for r in (1, 8, 16, 17, 48, 64)] == [16, 16, 16, 32, 64, 64]


def test_cuda_kernels_register_without_a_gpu():
    from feddpa_fast.kernels import triton_op
    triton_op.register_cuda_kernels()
    for name in ("lora_linear", "lora_linear_fwd", "lora_linear_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"feddpa::{name}", "CUDA")


def test_bad_input_is_checked_before_any_launch():
    inputs = make_inputs((4,), 48, 40, 8, torch.float32)
    inputs["lora_b"] = torch.randn(40, 7)
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_linear(**inputs, backend="triton")
    inputs = make_inputs((4,), 48, 40, 8, torch.float32, lora_input=True)
    inputs["lora_input"] = inputs["lora_input"].half()
    with pytest.raises(TypeError, match="lora_input has dtype"):
        lora_linear(**inputs, backend="triton")


def test_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch, pytest\n"
        "from feddpa_fast.kernels import lora_linear\n"
        "x = torch.randn(2, 16); w = torch.randn(8, 16); a = torch.randn(4, 16)\n"
        "b = torch.randn(8, 4); s = torch.ones(1, 4)\n"
        "try:\n"
        "    lora_linear(x, w, None, a, b, s, backend='triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert "ValueError: backend 'triton' cannot run on cpu" in out.stdout, out.stderr
