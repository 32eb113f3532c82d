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

from op_cases import assert_close_scaled, assert_close_to_reference, make_inputs  # noqa: E402

from feddpa_fast.kernels import lora_linear  # noqa: E402
from feddpa_fast.kernels.triton_config import interpreting, padded_rank  # noqa: E402

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


def _reference(inputs):
    from feddpa_fast.kernels import reference
    return reference.lora_linear_forward(
        **{k: (v.double() if v is not None else None) for k, v in inputs.items()})


@pytest.mark.parametrize("split,lora_input", [(2, False), (3, False), (4, True), (1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_scale,bias", [(False, True), (True, False)])
def test_split_k_decode_forward_one_launch(split, dtype, lora_input, row_scale, bias):
    """The decode kernel reduces its K slices inside the launch (last program to arrive); 5 K
    blocks over the slices, so slices differ in length (one is empty at split 4)."""
    from feddpa_fast.kernels import triton_decode
    from feddpa_fast.kernels.triton_config import FwdConfig
    inputs = make_inputs((3,), 80, 96, 16, dtype, row_scale=row_scale, bias=bias,
                         lora_input=lora_input)
    cfg = FwdConfig(16, 32, 16, 16, num_warps=4, num_stages=1)
    y, u = triton_decode.forward(inputs["x"], inputs["weight"], inputs["bias"],
                                 inputs["lora_a"], inputs["lora_b"], inputs["scale"],
                                 inputs.get("lora_input"), cfg=cfg, split=split)
    y_ref, u_ref = _reference(inputs)
    assert y.dtype == dtype and u.dtype == torch.float32
    assert_close_scaled(y, y_ref, dtype, "split-K output")
    assert_close_scaled(u, u_ref, dtype, "split-K u")
    # The arrival counters are left zeroed for the next launch.
    assert int(triton_decode._counters(y.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lora_input", [False, True])
def test_forward_runs_of_column_tiles(chunks, dtype, lora_input):
    """Each program computes u once for a run of column tiles: 5 column tiles split into
    1, 2, 3 or 5 runs give the same y and u as the reference."""
    from feddpa_fast.kernels import triton_forward
    from feddpa_fast.kernels.triton_config import FwdConfig
    inputs = make_inputs((67,), 48, 80, 16, dtype, lora_input=lora_input)
    x2, w, a, b = inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"]
    xl2 = inputs.get("lora_input")
    y = torch.full((67, 80), float("nan"), dtype=dtype)  # poisoned: every element must be written
    u = torch.full((67, 16), float("nan"))
    cfg = FwdConfig(32, 16, 16, 16, num_warps=4, num_stages=1)
    launch = triton_forward.forward_plan(x2, w, inputs["bias"], a, b, inputs["scale"], y, u,
                                         xl2, use_tma=False, cfg=cfg, sms=4, chunks=chunks)
    assert launch.grid == (3 * chunks,)
    launch.run()
    y_ref, u_ref = _reference(inputs)
    assert_close_scaled(y, y_ref, dtype, "chunked output")
    assert_close_scaled(u, u_ref, dtype, "chunked u")


@pytest.mark.parametrize("lora_input", [False, True])
def test_forward_tensor_descriptor_path(lora_input):
    """USE_TMA (tensor descriptors; on GPU: sm_90+, 16-bit) in the interpreter, fp16, with
    M, N, K and R not multiples of the tiles: the descriptors zero-fill out of bounds."""
    import triton

    from feddpa_fast.kernels import triton_forward
    from feddpa_fast.kernels.triton_config import FwdConfig
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    inputs = make_inputs((37,), 72, 50, 8, torch.float16, lora_input=lora_input)
    x2, w, a, b = inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"]
    y = torch.full((37, 50), float("nan"), dtype=torch.float16)
    u = torch.full((37, 8), float("nan"))
    cfg = FwdConfig(32, 16, 16, 16, num_warps=4, num_stages=1)
    triton_forward.forward_plan(x2, w, inputs["bias"], a, b, inputs["scale"], y, u,
                                inputs.get("lora_input"), use_tma=True, cfg=cfg, sms=4,
                                chunks=2).run()
    y_ref, u_ref = _reference(inputs)
    assert_close_scaled(y, y_ref, torch.float16, "TMA output")
    assert_close_scaled(u, u_ref, torch.float16, "TMA u")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_measured_alternatives_match_reference(dtype):
    """The per-tile schedule and the two-launch split (bench/op_gpu.py) compute the op too."""
    from feddpa_fast.kernels import triton_forward_pertile, triton_split
    inputs = make_inputs((67,), 80, 96, 16, dtype)
    y_ref, u_ref = _reference(inputs)
    y, u = triton_forward_pertile.forward(**inputs)
    assert_close_scaled(y, y_ref, dtype, "per-tile y")
    assert_close_scaled(u, u_ref, dtype, "per-tile u")
    y, u = triton_split.forward(**inputs)
    assert_close_scaled(y, y_ref, dtype, "split y")
    assert_close_scaled(u, u_ref, dtype, "split u")


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


@pytest.mark.parametrize("name", ["pertile", "split"])
def test_measured_alternatives_gradients(name):
    """The alternatives run under autograd with the regular Triton backward (the benchmark's
    fwd+bwd rows)."""
    from feddpa_fast.kernels import triton_op
    op = triton_op.alternative(name)
    inputs = make_inputs((67,), 48, 40, 16, torch.float32)
    assert_close_to_reference(lambda **kw: op(kw["x"], kw["weight"], kw["bias"], kw["lora_a"],
                                             kw["lora_b"], kw["scale"]), inputs,
                              wanted=("x", "lora_a", "lora_b", "scale", "bias"))
